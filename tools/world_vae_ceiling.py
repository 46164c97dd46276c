"""What a world's VAE lets through: each generic style read back, and each concept's fresh renders nearest its own
references, on ground-truth renders and on the same renders after an encode-decode round trip through the base's VAE
(what any base model drawing through that VAE can reach at best).

    python tools/world_vae_ceiling.py WORLD [N]

WORLD: a built world (its base/vae and evaluator). N: pictures per style (default 28), a third of it per concept. The
style reader is the check's (`WorldEvaluator.read_style`); the concept rule is `nearest_concepts` against the ten
concepts' references (no class option, unlike the CA-ceiling gate).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from fl2t.metrics import nearest_concepts
from fl2t.world.concepts import CONCEPTS, reference_scenes
from fl2t.world.generator import GENERIC_STYLES, random_scene, render, to_array
from fl2t.worldkit import check


def round_trip(vae: AutoencoderKL, images: list[Image.Image]) -> list[Image.Image]:
    x = torch.from_numpy(to_array(images))
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return [Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for t in y]


def main(world: str, n: int = 28) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    vae = AutoencoderKL.from_pretrained(Path(world) / "base" / "vae").eval()
    ev = check.WorldEvaluator(Path(world) / "evaluator")
    rng = np.random.default_rng(0)
    print(f"generic style read back ({n} pictures each): ground truth / after the VAE")
    for style in GENERIC_STYLES:
        scenes = [replace(random_scene(rng, held_out=None), style=style, size="large") for _ in range(n)]
        images = [render(s) for s in scenes]
        a, b = (np.mean([r == style for r in ev.read_style(im, scenes)]) for im in (images, round_trip(vae, images)))
        print(f"  {style:9s} {a:.2f} / {b:.2f}")
    refs = {c.name: ev.image_embeds([render(s) for s in reference_scenes(c)]) for c in CONCEPTS}
    per = max(1, n // 3)
    print(f"concept renders nearest own references ({per} each): ground truth / after the VAE")
    for k, c in enumerate(CONCEPTS):
        crng = np.random.default_rng([check.CHECK_SEED, k])
        images = [render(c.scene(crng)) for _ in range(per)]
        a, b = (
            np.mean([x == c.name for x in nearest_concepts(ev.image_embeds(im), refs, None)])
            for im in (images, round_trip(vae, images))
        )
        print(f"  {c.name:12s} {a:.2f} / {b:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
