"""A world v2 VAE trained alone with other steps or widths, then read by tools/world_vae_ceiling.py: how much of the
generic styles and the style concepts a VAE lets through (issue 14: the 32 px world's VAE carries chunky 0.04 and
outline 0.33 of what ground truth gives).

    python tools/world_vae_variant.py WORLD OUT STEPS '{"block_out_channels": [32, 64], "layers_per_block": 2}'

WORLD: a built v2 world (its evaluator is linked into OUT for the reading). The pictures are the build's rich ones
(`V2_MIX`'s shares, the build's seed); the JSON overrides `models.new_vae`'s AutoencoderKL arguments. One thread
(THREADS=N for more), so two can share 2 cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from fl2t.world.concepts import concept_appearances
from fl2t.world.generator import random_scene
from fl2t.worldkit import build, models, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from world_vae_ceiling import main as ceiling  # noqa: E402


def main(world: str, out: str, steps: str, overrides: str = "{}") -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    knobs = json.loads(overrides)
    s = build.BuildSettings(**build.V2_MIX)
    exclude = concept_appearances()
    rng = np.random.default_rng(build._stage_seed(s.seed, "rich"))
    scenes = [random_scene(rng, rich=True, held_out=None, exclude=exclude) for _ in range(s.rich_images)]
    scenes = build._mix(s.seed, "rich", scenes, s.rich_pair_share, s.rich_style_share, exclude)
    data = train.render_dataset(scenes, lambda n: None)
    default = models.new_vae

    def new_vae() -> AutoencoderKL:
        config = {**dict(default().config), **knobs}
        return AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})

    models.new_vae = new_vae
    t0 = time.time()
    vae = train.train_vae(data, int(steps), build._stage_seed(s.seed, "vae"), lambda n: None)
    folder = Path(out)
    vae.save_pretrained(folder / "base" / "vae", safe_serialization=True)
    if not (folder / "evaluator").exists():
        (folder / "evaluator").symlink_to(Path(world).resolve() / "evaluator")
    params = sum(p.numel() for p in vae.parameters())
    print(f"trained {steps} steps in {time.time() - t0:.0f} s ({params} parameters; {knobs or 'the build VAE'})")
    ceiling(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
