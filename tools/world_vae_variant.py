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

import torch

from fl2t.worldkit import build, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from world_vae_ceiling import main as ceiling  # noqa: E402


def main(world: str, out: str, steps: str, overrides: str = "{}") -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    knobs = json.loads(overrides)
    s = build.BuildSettings(**build.V2_MIX)
    data = train.render_dataset(build.rich_scenes(s), lambda n: None)
    t0 = time.time()
    vae = train.train_vae(data, int(steps), build._stage_seed(s.seed, "vae"), lambda n: None, **knobs)
    folder = Path(out)
    vae.save_pretrained(folder / "base" / "vae", safe_serialization=True)
    if not (folder / "evaluator").exists():
        (folder / "evaluator").symlink_to(Path(world).resolve() / "evaluator")
    params = sum(p.numel() for p in vae.parameters())
    print(f"trained {steps} steps in {time.time() - t0:.0f} s ({params} parameters; {knobs or 'the build VAE'})")
    ceiling(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
