"""The base model alone on the oracle pairs, each concept described in the world's own words instead of its token
("a green and red split square to the left of a blue ring with a red centre dot"): can the base draw both concepts'
looks in one picture at all? The presence score on the oracle pairs' seeds, both present and each concept's share:
a ceiling, set by the base's binding of words, for what any pair of experts can reach.

    THREADS=1 python tools/world_described_pairs.py WORLD [GRID.png]
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fl2t.world.concepts import get_concept
from fl2t.world.generator import Scene, object_phrase
from fl2t.world.presence import Presence
from fl2t.worldkit import check


def described(name: str) -> str:
    c = get_concept(name)
    return object_phrase(Scene(c.shape, c.colour, "black", "in the center", "small", c.pattern, c.colour2), False)


torch.set_num_threads(int(os.environ.get("THREADS", "1")))
ctx = check.CheckContext(Path(sys.argv[1]))
presence, images, both = Presence(ctx.evaluator), [], []
seeds = check.ORACLE_PAIR_SEEDS
for a, b in check.ORACLE_PAIRS:
    prompt = f"a {described(a)} to the left of a {described(b)}"
    got = ctx.base_images([prompt] * len(seeds), seeds)
    found = presence(got, [a, b])
    both.append(found.all(axis=1))
    images += got
    print(
        f"{prompt!r}: both {found.all(axis=1).mean():.2f}, {a} {found[:, 0].mean():.2f}, {b} {found[:, 1].mean():.2f}"
    )
print(f"both present, {len(images)} images: {np.concatenate(both).mean():.3f}")
if len(sys.argv) > 2:
    side, per = images[0].width, len(seeds)
    sheet = Image.new("RGB", (per * side, 3 * side))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % per) * side, (i // per) * side))
    sheet.save(sys.argv[2])
