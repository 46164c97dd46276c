"""What the base model draws for two-object prompts, pair by pair: the share with both named shapes (on either
side) per ordered shape pair, and the commonest misreads, on the held-out pairs of `fl2t world check`'s pair gate
(the same 84 prompts and seeds) and on 84 pairs pretraining showed (`tools/world_base_variant.py`'s).

    [THREADS=2] python tools/world_pair_reads.py WORLD_DIR
"""

import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from fl2t.world.generator import pair_caption
from fl2t.worldkit import check

sys.path.insert(0, str(Path(__file__).parent))
from world_base_variant import seen_pairs  # noqa: E402


def main(world: str) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    ctx = check.CheckContext(Path(world))
    groups = (
        ("held out", check.pair_prompts(), check.CHECK_SEED + 40_000),
        ("seen in pretraining", seen_pairs(), 999),
    )
    for name, scenes, seed in groups:
        images = ctx.base_images([pair_caption(p) for p in scenes], [seed + i for i in range(len(scenes))])
        per: dict[tuple[str, str], list[bool]] = defaultdict(list)
        misreads: Counter = Counter()
        same = 0  # misread pictures whose two objects read as one shape
        for (left, right), p in zip(ctx.evaluator.read_halves(images), scenes):
            ok = {left[0], right[0]} == set(p.shapes)
            per[p.shapes].append(ok)
            if not ok:
                misreads[f"{'+'.join(p.shapes)} read {left[0]}+{right[0]}"] += 1
                same += left[0] == right[0]
        print(
            f"{name}: both shapes {np.mean([x for v in per.values() for x in v]):.3f} of {len(scenes)}; "
            f"misread as two of one shape {same}"
        )
        for shapes, hits in sorted(per.items()):
            print(f"  {'+'.join(shapes):18s} {np.mean(hits):.2f} of {len(hits)}")
        print("  commonest misreads: " + ", ".join(f"{k} ({n})" for k, n in misreads.most_common(6)))


if __name__ == "__main__":
    main(sys.argv[1])
