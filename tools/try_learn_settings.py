"""Learn the tiny world's stripestar with given LearnSettings and print time, concept accuracy and normalised IA
(the Step-1 gate of `fl2t world check`), then continue the LoRA through checkdiamond and bullseye and print
stripestar's concept accuracy again (the forgetting gate). Usage: python tools/try_learn_settings.py WORLD_DIR '{"lr": 1e-3}' ...
WORLD_DIR: a built world (src/fl2t/world/weights)."""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))  # THREADS=1 beside another job
from fl2t.config import LearnSettings
from fl2t.methods import METHODS, MethodContext
from fl2t.worldkit.check import CheckContext, Step1

ctx = CheckContext(Path(sys.argv[1]))
tmp = Path(tempfile.mkdtemp())
s1 = Step1(ctx, tmp)
for spec in sys.argv[2:]:
    kw = json.loads(spec)
    settings = LearnSettings(checkpoint_every=0, **kw)
    seq = METHODS["sequential"](
        MethodContext(
            base=str(Path(sys.argv[1]) / "base"), learn=settings, workdir=tmp / f"seq{hash(spec)}", store=tmp / "store"
        )
    )
    t0 = time.perf_counter()
    seq.learn(s1.concepts["stripestar"])
    sec = time.perf_counter() - t0
    ca, nia, _, _ = s1.score("stripestar", seq.sampler())
    print(spec, f"{sec:.1f}s CA {ca:.3f} nIA {nia:.3f}", flush=True)
    for name in ("checkdiamond", "bullseye"):
        seq.learn(s1.concepts[name])
    ca3, nia3, _, _ = s1.score("stripestar", seq.sampler())
    print(spec, f"after 3 tasks: CA {ca3:.3f} nIA {nia3:.3f} (drop {100 * (ca - ca3):.1f} points)", flush=True)
