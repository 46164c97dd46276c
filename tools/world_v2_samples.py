"""A grid of world v2's new pictures: each generic style (a row each, six random objects) and two rows of two-object
scenes.   python tools/world_v2_samples.py OUT.png"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from PIL import Image

from fl2t.images import image_grid
from fl2t.world.generator import GENERIC_STYLES, random_pair, render, render_pair, styled_scene


def main(out: str) -> None:
    rng = np.random.default_rng(1)
    images = [render(replace(styled_scene(rng, held_out=None), style=st)) for st in GENERIC_STYLES for _ in range(6)]
    images += [render_pair(random_pair(rng, held_out=None)) for _ in range(12)]
    grid = image_grid(images, columns=6)
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(out)


if __name__ == "__main__":
    main(sys.argv[1])
