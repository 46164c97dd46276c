"""The spread over two Step-1 training seeds: the same benchmark run twice, `learn.seed` 0 and 1 (e.g. runs of
tiny10 and tiny10-seed1), compared per method on their common orders' final rows:

    python tools/seed_spread.py RUN_SEED0 RUN_SEED1 [METHOD ...]

Per method: the final average nIA and CA of each run with its 95% interval, and the paired difference (seed 1 −
seed 0, over the same prompts and sampling seeds) with its interval (fl2t.bench.stats). Default methods: every
method both runs finished.
"""

import json
import sys
from pathlib import Path

from fl2t.bench.stats import final_samples, interval, paired


def tasks(run: Path, method: str, orders: int) -> list[list[dict]] | None:
    out = []
    for k in range(orders):
        folder = run / method / f"order{k}"
        files = sorted(folder.glob("task*.json"), key=lambda p: int(p.stem[4:]))
        if not files or len(files) != len(json.loads((folder / "order.json").read_text())):
            return None
        out.append([json.loads(p.read_text()) for p in files])
    return out


def orders(run: Path) -> int:
    return len({p.parent.name for p in run.glob("*/order*/task*.json")})


def main() -> None:
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    common = min(orders(a), orders(b))
    methods = sys.argv[3:] or sorted({p.name for p in a.iterdir() if (b / p.name).is_dir() and (p / "order0").is_dir()})
    print(f"{a.name} (seed 0) against {b.name} (seed 1), final rows of their first {common} order(s); ± 95% intervals")
    print(f"{'method':<14} {'metric':<6} {'seed 0':>22} {'seed 1':>22} {'seed 1 − seed 0':>30}")
    for method in methods:
        ra, rb = tasks(a, method, common), tasks(b, method, common)
        if ra is None or rb is None:
            print(f"{method:<14} not finished in both runs")
            continue
        for metric in ("nia", "ca"):
            sa, sb = final_samples(ra, metric), final_samples(rb, metric)
            cells = []
            for s in (sa, sb):
                point, (lo, hi) = interval([list(v.values()) for v in s.values()])
                cells.append(f"{point:.3f} ({lo:.3f} to {hi:.3f})")
            d = paired(sb, sa)
            diff = f"{d['diff']:+.3f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})"
            print(f"{method:<14} {metric:<6} {cells[0]:>22} {cells[1]:>22} {diff:>30}")


if __name__ == "__main__":
    main()
