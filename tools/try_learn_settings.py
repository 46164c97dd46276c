"""Learn tiny-world concepts alone with given LearnSettings and print each one's time, concept accuracy and
normalised IA (80 images: the Step-1 gates of `fl2t world check`); for stripestar, then continue its LoRA through
checkdiamond and bullseye and print stripestar's concept accuracy again (the forgetting gate).

    [CONCEPTS=stripestar,eyering] [THREADS=2] [TIMESTEPS=0,500] python tools/try_learn_settings.py WORLD_DIR \
        '{"lr": 1e-3}' ...

WORLD_DIR: a built world (src/fl2t/world/weights). CONCEPTS: the concepts to learn (default stripestar).
TIMESTEPS=LO,HI: an experiment outside LearnSettings, training timesteps drawn from [LO, HI) instead of [0, 1000).
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))  # THREADS=1 beside another job
import fl2t.experts
from fl2t.config import LearnSettings
from fl2t.methods import METHODS, MethodContext
from fl2t.worldkit.check import STEP1_CONCEPTS, CheckContext, Step1

if "TIMESTEPS" in os.environ:
    lo, hi = (int(t) for t in os.environ["TIMESTEPS"].split(","))

    def _narrowed(latents, noise_scheduler, noise_offset, gen):  # fl2t.experts._noised, timesteps in [lo, hi)
        noise = torch.randn(latents.shape, generator=gen)
        if noise_offset:
            noise += noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        timesteps = torch.randint(lo, hi, (len(latents),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            return noisy, timesteps, noise_scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, noise

    fl2t.experts._noised = _narrowed

ctx = CheckContext(Path(sys.argv[1]))
tmp = Path(tempfile.mkdtemp())
s1 = Step1(ctx, tmp)
for spec in sys.argv[2:]:
    for concept in os.environ.get("CONCEPTS", STEP1_CONCEPTS[0]).split(","):
        settings = LearnSettings(checkpoint_every=0, **json.loads(spec))
        workdir = tmp / f"seq-{concept}-{abs(hash(spec))}"
        seq = METHODS["sequential"](MethodContext(str(Path(sys.argv[1]) / "base"), settings, workdir, tmp / "store"))
        t0 = time.perf_counter()
        seq.learn(s1.concepts[concept])
        sec = time.perf_counter() - t0
        ca, nia, _, _ = s1.score(concept, seq.sampler())
        norm = seq.library.expert(concept).token_embeddings.norm(dim=-1).mean()  # the learned token rows' mean norm
        print(concept, spec, f"{sec:.1f}s CA {ca:.3f} nIA {nia:.3f} token norm {norm:.3f}", flush=True)
        if concept != STEP1_CONCEPTS[0]:
            continue
        for name in STEP1_CONCEPTS[1:]:
            seq.learn(s1.concepts[name])
        ca3, nia3, _, _ = s1.score(concept, seq.sampler())
        print(concept, spec, f"after 3 tasks: CA {ca3:.3f} nIA {nia3:.3f} (drop {100 * (ca - ca3):.1f} points)")
