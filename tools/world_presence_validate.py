"""The tiny world's presence score (fl2t.world.presence) on ground-truth renders that no bank holds: per group,
per object concept and per style concept, the share judged right.

    python tools/world_presence_validate.py [SEEDS STYLE_SEEDS [EVALUATOR_FOLDER]]

EVALUATOR_FOLDER: a built world's evaluator (default: the shipped world's).
"""

import sys
import time

from fl2t.metrics import ClipEvaluator
from fl2t.world import evaluator_path
from fl2t.world.presence import validation


def main(seeds: int = 3, style_seeds: int = 6, folder: str | None = None) -> None:
    t = time.time()
    result = validation(ClipEvaluator.load(folder or evaluator_path()), seeds=seeds, style_seeds=style_seeds)
    for key in sorted(k for k in result if not k.startswith("n/")):
        print(f"{key:<46} {result[key]:6.3f}  (n={result['n/' + key]})")
    print(f"{time.time() - t:.0f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), *sys.argv[3:4])
