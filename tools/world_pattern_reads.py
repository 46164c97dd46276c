"""Which two-colour patterns a world's base model draws from words (issue 14: an object concept's expert starts from
what the base draws of its look; checkdiamond's experts draw swirls, not checks).

    THREADS=2 python tools/world_pattern_reads.py WORLD [WORLD ...]

For each pattern of `PATTERNS`, PER_PATTERN prompts naming it on a random shape, two distinct colours and a random
background ("a large red and green checkered square on a gray background, in the center"), no concept's look among
them; each base image is read by the world's evaluator as the pattern whose renders of the same shape, colours and
background (RENDERS jitters each, all seven patterns) it is nearest to on mean cosine. Printed per pattern: the share
read as the named pattern, and what the others were read as; first the same rule on fresh renders of the prompts
(the rule's ceiling).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fl2t.world.concepts import CONCEPTS
from fl2t.world.generator import BACKGROUNDS, COLOURS, PATTERNS, SHAPES, Scene, caption, render
from fl2t.worldkit import check

PER_PATTERN = 16
RENDERS = 4


def pattern_scenes() -> list[Scene]:
    """PER_PATTERN looks per pattern (random shape, two colours, background), none a concept's look."""
    rng = np.random.default_rng(11)
    looks = {c.appearance for c in CONCEPTS}
    scenes = []
    for pattern in PATTERNS:
        while sum(s.pattern == pattern for s in scenes) < PER_PATTERN:
            c, c2 = rng.choice(list(COLOURS), size=2, replace=False)
            s = Scene(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=str(c),
                background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                position="in the center",
                size="large",
                pattern=pattern,
                colour2=str(c2),
                jitter=int(rng.integers(2**31)),
            )
            if (s.shape, s.pattern, s.colour, s.colour2) not in looks:
                scenes.append(s)
    return scenes


def read(ctx: check.CheckContext, images: list, scenes: list[Scene]) -> list[str]:
    """Per image, the pattern whose renders of its scene (other jitters) it is nearest to."""
    emb = ctx.evaluator.image_embeds(images)
    out = []
    for e, s in zip(emb, scenes):
        cands = [replace(s, pattern=p, jitter=s.jitter + k + 1) for p in PATTERNS for k in range(RENDERS)]
        ref = ctx.evaluator.image_embeds([render(c, ctx.side) for c in cands]).view(len(PATTERNS), RENDERS, -1)
        out.append(PATTERNS[int((ref @ e).mean(dim=1).argmax())])
    return out


def report(label: str, reads: list[str], scenes: list[Scene]) -> None:
    ok = [r == s.pattern for r, s in zip(reads, scenes)]
    print(f"{label}: {np.mean(ok):.3f} of {len(ok)} read as the named pattern", flush=True)
    for p in PATTERNS:
        got = [r for r, s in zip(reads, scenes) if s.pattern == p]
        wrong = Counter(r for r in got if r != p).most_common(3)
        others = ", ".join(f"{r} {n}" for r, n in wrong)
        print(f"  {p:10s} {np.mean([r == p for r in got]):.2f}" + (f"  (read as {others})" if others else ""))


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    scenes = pattern_scenes()
    for i, world in enumerate(sys.argv[1:]):
        ctx = check.CheckContext(Path(world))
        if i == 0:
            report(
                "fresh renders (the rule's ceiling)", read(ctx, [render(s, ctx.side) for s in scenes], scenes), scenes
            )
        images = ctx.base_images([caption(s) for s in scenes], list(range(len(scenes))))
        report(f"{world}: the base model's images", read(ctx, images, scenes), scenes)


if __name__ == "__main__":
    main()
