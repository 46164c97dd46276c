"""Does a 48 x 48 base model draw both objects of a held-out two-object prompt? (issue 14: the pair gate at the size
it approves when two objects cannot be told apart at 32 x 32). A base trained from scratch on the world's pretraining
pictures rendered at 48 px (`render(scene, 48)`: every length x 1.5) with a share of two-object scenes and no generic
styles, on the shipped VAE (it reconstructs 48 px renders as well as 32 px ones: tools/world_48_probe.py); then
`fl2t world check`'s pair and single-object gates, read by the shipped evaluator (which resizes to 32 px, as real CLIP
resizes). `fl2t world build --v2` now builds a whole 48 px world; this is the quicker base-only experiment.

    python tools/world_48_pairs.py OUT [STEPS] [PAIR_SHARE]

OUT gets the base pipeline (diffusers folder) and OUT/pairs.png (the first 28 pair images). The 2400-step figure in
docs/world.md was measured with this tool at commit c64388d, which scaled the radii but not the pattern periods.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from fl2t.models import build_pipeline
from fl2t.sampling import Sampler
from fl2t.world import base_path, evaluator_path
from fl2t.world.generator import pair_caption
from fl2t.worldkit import build, check, models, train

SIZE = 48


def main(out: str, steps: int = 2000, pair_share: float = 0.4) -> None:
    torch.set_num_threads(2)
    folder = Path(out)
    seed = build.DEFAULT_SEED
    evaluator = check.WorldEvaluator(evaluator_path())
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(base_path() / "vae").eval()
    scenes = build.pretraining_scenes(seed, build.BuildSettings().plain_images, pair_share, 0.0)
    data = train.render_dataset(scenes, lambda n: None, SIZE)
    latents = train.encode_latents(vae, data, lambda n: None)
    print(
        f"rendered and encoded {len(scenes)} pictures at {SIZE} px ({latents.shape[-1]}^2 latents): {time.time() - t0:.0f} s"
    )
    t0 = time.time()
    unet, text, done = train.train_base(
        latents, scenes, steps, build._stage_seed(seed, "base"), lambda n: None, log=lambda m: print(m, flush=True)
    )
    print(f"base: {done} steps in {time.time() - t0:.0f} s", flush=True)
    pipe = build_pipeline(unet, vae, text, models.sample_scheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    sample = Sampler(pipe, batch=check.CHECK_BATCH)

    pairs = check.pair_prompts()
    prompts = [pair_caption(p) for p in pairs]
    images = sample(prompts, [check.CHECK_SEED + 40_000 + i for i in range(len(prompts))], 25, 5.0)
    read = evaluator.read_halves(images)
    both = np.mean([{a[0], b[0]} == set(p.shapes) for (a, b), p in zip(read, pairs)])
    order = np.mean([(a[0], b[0]) == p.shapes for (a, b), p in zip(read, pairs)])
    print(
        f"pair gate: both shapes of a held-out two-object prompt {both:.3f} ({len(images)} images; named order {order:.3f})"
    )
    single, scenes1 = check.base_prompts()
    images1 = sample(single, [check.CHECK_SEED + i for i in range(len(single))], 25, 5.0)
    read1 = evaluator.read(images1)
    for k, attr in enumerate(("shape", "colour")):
        acc = np.mean([r[k] == getattr(s, attr) for r, s in zip(read1, scenes1)])
        print(f"single objects: requested {attr} read back {acc:.3f} ({len(images1)} images)")
    sheet = Image.new("RGB", (7 * SIZE * 2, 4 * SIZE * 2))
    for i, im in enumerate(images[:28]):
        sheet.paste(im.resize((SIZE * 2, SIZE * 2), Image.NEAREST), ((i % 7) * SIZE * 2, (i // 7) * SIZE * 2))
    sheet.save(folder / "pairs.png")


if __name__ == "__main__":
    main(sys.argv[1], *(float(x) if "." in x else int(x) for x in sys.argv[2:]))
