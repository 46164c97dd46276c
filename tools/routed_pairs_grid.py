"""A PNG of tiny10's two-concept prompts: per pair, a row of `lookup` images (both experts summed) and a row of
`lookup+routed` images (each expert where its tokens' cross-attention falls), the same seeds as the benchmark.

    python tools/routed_pairs_grid.py OUT.png [N_SEEDS]

Uses the experts of results/tiny10 (run `fl2t bench continual --config tiny10 --out results` first).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from fl2t.bench.continual import Benchmark, load_config
from fl2t.methods.lookup import Lookup
from fl2t.sampling import Sampler
from fl2t.world import get_concept

SCALE = 3


def tiny10_samplers() -> tuple[Any, dict[str, Sampler]]:
    """tiny10's config and the samplers of `lookup` and `lookup+routed` over order 0's experts (the same ones)."""
    cfg = load_config("tiny10", orders=1)
    routed = Benchmark(cfg, Path("results"), ["lookup+routed"]).method("lookup+routed", 0)
    if len(routed.tasks) < len(cfg.concepts):
        raise SystemExit(f"lookup+routed: run tiny10 first (its order 0 has {len(routed.tasks)} tasks)")
    return cfg, {"lookup": Lookup(routed.ctx).sampler(), "lookup+routed": routed.sampler()}


def main(out: str, n: int = 4) -> None:
    torch.set_num_threads(1)
    cfg, samplers = tiny10_samplers()
    seeds = [cfg.seed + 90_000 + i for i in range(n)]  # the benchmark's multi-concept seeds
    rows: list[tuple[str, list[Image.Image]]] = []
    for pair in cfg.multi:
        concepts = sorted((get_concept(c) for c in pair), key=lambda c: c.kind != "object")
        kinds = "+".join(c.kind for c in concepts)
        prompt = cfg.multi_prompts[kinds].format(*(c.subject for c in concepts))
        for method, sampler in samplers.items():
            images = sampler([prompt] * n, seeds, cfg.sample.steps, cfg.sample.guidance)
            rows.append((f"{method}: {'+'.join(pair)}", images))
    side, label = 32 * SCALE, 230
    sheet = Image.new("RGB", (label + n * side, len(rows) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (text, images) in enumerate(rows):
        draw.text((4, r * side + side // 2 - 6), text, fill="black")
        for c, im in enumerate(images):
            sheet.paste(im.resize((side, side), Image.NEAREST), (label + c * side, r * side))
    sheet.save(out)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1], *(int(x) for x in sys.argv[2:]))
