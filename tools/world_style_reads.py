"""The base model's generic styles read back, on the style gate's held-out shapes and on shapes pretraining did draw
each style on, by the world's evaluator and optionally a second one: is a failing style gate the base's drawing or
its generalisation, and does another evaluator read the same pictures differently?

    python tools/world_style_reads.py WORLD [OTHER_EVALUATOR]

The held-out pictures are the gate's own (`check.style_prompts`, the gate's seeds); the seen ones are 14 prompts per
style drawn the same way with the shape among the style's pretraining shapes. 84 images each, THREADS=N (default 2).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fl2t.world.generator import GENERIC_STYLES, SHAPES, caption, is_held_out_style, random_scene
from fl2t.worldkit import check


def seen_style_prompts() -> list:
    rng = np.random.default_rng(check.CHECK_SEED + 3)
    scenes = []
    for style in GENERIC_STYLES:
        shapes = [sh for sh in SHAPES if not is_held_out_style(style, sh)]
        for _ in range(check.STYLE_PROMPTS_PER_STYLE):
            scene = random_scene(rng, held_out=None)
            scenes.append(replace(scene, shape=shapes[rng.integers(len(shapes))], style=style, size="large"))
    return scenes


def main(world: str, other: str | None = None) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    ctx = check.CheckContext(Path(world))
    evaluators = {"evaluator": ctx.evaluator}
    if other:
        evaluators[other] = check.WorldEvaluator(Path(other))
    for name, scenes in (("held-out shape", check.style_prompts()), ("seen shape", seen_style_prompts())):
        prompts = [caption(s, with_size=False) for s in scenes]
        images = ctx.base_images(prompts, [check.CHECK_SEED + 50_000 + i for i in range(len(prompts))])
        for label, ev in evaluators.items():
            hits = [r == s.style for r, s in zip(ev.read_style(images, scenes), scenes)]
            per = " ".join(
                f"{st} {np.mean([h for h, s in zip(hits, scenes) if s.style == st]):.2f}" for st in GENERIC_STYLES
            )
            print(f"{name:15s} {label}: {np.mean(hits):.3f}  {per}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
