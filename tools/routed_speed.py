"""Seconds per image of a two-concept prompt, routed (`lookup+routed`) against summed (`lookup`), interleaved.

    python tools/routed_speed.py [ROUNDS]

Uses tiny10's shared experts in results/tiny10 (run `fl2t bench continual --config tiny10 --out results` first) and
its first object+object pair, 25 steps, guidance 5, one image per call, one thread; prints the median seconds of
each and their ratio. Routed generation makes k + 2 UNet passes of one image a step (k named concepts) where
classifier-free guidance makes one pass of two.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from routed_pairs_grid import tiny10_samplers

from fl2t.world import get_concept


def main(rounds: int = 5) -> None:
    torch.set_num_threads(1)
    cfg, samplers = tiny10_samplers()
    a, b = next(p for p in cfg.multi if all(get_concept(n).kind == "object" for n in p))
    prompt = cfg.multi_prompts["object+object"].format(get_concept(a).subject, get_concept(b).subject)
    times: dict[str, list[float]] = {k: [] for k in samplers}
    for r in range(rounds + 1):
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            sampler([prompt], [r], steps=25, guidance=5.0)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{prompt!r}: lookup {med['lookup']:.3f} s, lookup+routed {med['lookup+routed']:.3f} s per image, "
        f"ratio {med['lookup+routed'] / med['lookup']:.2f} (median of {rounds}, one thread)"
    )


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:]))
