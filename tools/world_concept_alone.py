"""One world concept learned alone with the check's Step-1 settings, its concept accuracy split by what the prompt
says of the background (issue 14: where a concept's expert falls back to its plain class).

    THREADS=2 python tools/world_concept_alone.py WORLD CONCEPT [CONCEPT ...]

The same expert, prompts, seeds and rule as `fl2t world check --full`'s "every concept learned alone" row; per
concept, also the backgrounds of its reference pictures.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fl2t.methods import METHODS, MethodContext
from fl2t.world.concepts import get_concept, reference_scenes
from fl2t.worldkit import check


def main() -> None:
    world, names = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    ctx = check.CheckContext(world)
    s1 = ctx.step1
    with tempfile.TemporaryDirectory() as tmp:
        lookup = METHODS["lookup"](MethodContext(str(world / "base"), ctx.learn, Path(tmp) / "w", Path(tmp) / "s"))
        for name in names:
            lookup.learn(s1.concepts[name])
        sampler = lookup.sampler()
        for name in names:
            ca, _, _, own = s1.score(name, sampler)
            prompts, _ = s1.prompts(name)
            by = defaultdict(list)
            for p, o in zip(prompts, own):
                by[next((b for b in ("black", "white", "gray") if f"{b} background" in p), "none named")].append(o)
            refs = [s.background for s in reference_scenes(get_concept(name))]
            print(f"{name}: CA {ca:.3f}; references' backgrounds {', '.join(refs)}")
            for bg, hits in sorted(by.items()):
                print(f"  prompt names {bg:10s} CA {np.mean(hits):.2f} ({len(hits)} images)")


if __name__ == "__main__":
    main()
