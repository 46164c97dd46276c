"""The oracle pairs alone (the references issue 15's multi-concept rows are read against): the six object concepts
of tiny10's object pairs learned alone with tiny10's Step-1 settings, each one's concept accuracy, and
`fl2t.worldkit.check.oracle_pairs` on them (both experts summed at full weight, and span-restricted), each
concept's presence beside both; and each concept's accuracy with its token embedding and no LoRA (what of the
concept a later task's LoRA update cannot take away: a sequential LoRA forgets at most the rest). What `fl2t world check --full` reports, without learning the other four concepts.

    THREADS=1 python tools/world_oracle_pairs.py WORLD [GRID.png]
    PAIR_REFS=4 ...   each concept also learned from 4 pictures of it beside a plain object (`pair_reference_scenes`)
    LEARN='{"lora_attention": "cross", "lora_targets": ["to_k", "to_v"]}' ...   other Step-1 settings than tiny10's
    SWAP=1 ...        each pair named the other way round ("a <c-eyering> ring to the left of a <c-splitsquare> square")
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fl2t.methods import METHODS, MethodContext
from fl2t.sampling import Sampler
from fl2t.world.presence import Presence
from fl2t.worldkit import check


def main(world: str, grid: str | None = None) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    ctx = check.CheckContext(Path(world), pair_references=int(os.environ.get("PAIR_REFS", "0")))
    if os.environ.get("LEARN"):  # Step-1 settings over tiny10's, e.g. '{"lora_attention": "cross"}'
        ctx.learn = ctx.learn.model_copy(update=json.loads(os.environ["LEARN"]))
    pairs = check.ORACLE_PAIRS
    if os.environ.get("SWAP"):  # which concept is named first (and drawn left) changes, the concepts do not
        pairs = tuple((b, a) for a, b in pairs)
    s1 = ctx.step1
    names = [n for pair in pairs for n in pair]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        lookup, span = (
            METHODS[m](MethodContext(str(ctx.weights / "base"), ctx.learn, Path(tmp) / m, store))
            for m in ("lookup", "lookup+span")
        )
        for name in names:
            t0 = time.perf_counter()
            lookup.learn(s1.concepts[name])
            span.learn(s1.concepts[name])
            ca = s1.score(name, lookup.sampler())[0]
            seconds = time.perf_counter() - t0
            tokens = Sampler(lookup.base_pipeline([lookup.library.expert(name)]), batch=check.CHECK_BATCH)
            alone = s1.score(name, tokens)[0]  # how much of the concept its token embedding carries without the LoRA
            print(
                f"{name}: learned alone and scored in {seconds:.0f} s, CA {ca:.3f}, token alone {alone:.3f}", flush=True
            )
        for row in check.oracle_pairs(ctx, lookup, span, Presence(ctx.evaluator), pairs):
            print(f"{row.gate}: {row.value:.3f} ({row.detail})", flush=True)
    if grid:
        rows = [ctx.samples[f"oracle pairs {m}"] for m in ("lookup", "lookup+span")]
        side = rows[0][0].width
        per = len(rows[0]) // 3  # pictures per pair: one row of the sheet each
        sheet = Image.new("RGB", (per * side, 3 * side * len(rows)))
        for r, images in enumerate(rows):
            for i, im in enumerate(images):
                sheet.paste(im, ((i % per) * side, (3 * r + i // per) * side))
        sheet.save(grid)


if __name__ == "__main__":
    main(*sys.argv[1:])
