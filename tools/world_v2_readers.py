"""The world check's v2 readers on ground-truth renders of their own gates' prompts: the pair reader (both shapes and
colours of each half, in the named order; also on random pairs, 30% patterned) and the zero-shot generic-style
reader, per style.

    python tools/world_v2_readers.py EVALUATOR_FOLDER [SIDE]

SIDE: the pictures' side in pixels (default 32; 48 for the 48 px world v2, read as the evaluator reads them).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from fl2t.world.generator import GENERIC_STYLES, random_pair, render, render_pair
from fl2t.worldkit.check import WorldEvaluator, pair_prompts, style_prompts


def main(folder: str, side: int = 32) -> None:
    ev = WorldEvaluator(Path(folder))
    rng = np.random.default_rng(0)
    pairs = [replace(p, jitter=int(rng.integers(2**31))) for p in pair_prompts()]
    read = ev.read_halves([render_pair(p, side) for p in pairs])
    shapes = np.mean([(a[0], b[0]) == p.shapes for (a, b), p in zip(read, pairs)])
    colours = np.mean([(a[1], b[1]) == (p.left.colour, p.right.colour) for (a, b), p in zip(read, pairs)])
    print(f"pair reader, {len(pairs)} ground-truth pictures: shapes in order {shapes:.3f}, colours {colours:.3f}")
    patterned = [random_pair(rng, held_out=None, patterned=0.3) for _ in range(300)]
    read = ev.read_halves([render_pair(p, side) for p in patterned])
    shapes = np.mean([(a[0], b[0]) == p.shapes for (a, b), p in zip(read, patterned)])
    print(f"pair reader, 300 random ground-truth pairs, 30% patterned: shapes in order {shapes:.3f}")
    styled = style_prompts()
    read_styles = ev.read_style([render(s, side) for s in styled], styled)
    hits = np.mean([r == s.style for r, s in zip(read_styles, styled)])
    print(f"style reader, {len(styled)} ground-truth pictures: {hits:.3f}")
    for style in GENERIC_STYLES:
        got = Counter(str(r) for r, s in zip(read_styles, styled) if s.style == style)
        print(f"  {style}: {dict(got)}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
