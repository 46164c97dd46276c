"""`fl2t demo`: the main job on the built-in default, the tiny world.

The continual benchmark `tiny10` (the world's ten concepts as ten tasks) on one task order, with `fl2t`,
`merge`, `sequential` and `oracle`: each concept is learned (Step 1), fl2t consolidates after every task
(Step 2), every concept learned so far is generated and scored after every task, and the report is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEMO_METHODS = ("fl2t", "merge", "sequential", "oracle")


def run_demo(
    out: Path, steps: int, progress: Callable, say: Callable[[str], None], consolidate_steps: int = 30
) -> dict:
    from fl2t.bench.continual import load_config, run_continual

    say(
        "[bold]fl2t demo[/bold]: the tiny world's ten concepts learned one task at a time by "
        f"{', '.join(DEMO_METHODS)}; every concept learned so far is scored after each task"
    )
    cfg = load_config("tiny10")
    # A smaller budget than the benchmark's, so that the whole protocol fits in minutes on a CPU.
    learn = cfg.learn.model_copy(update={"steps": steps, "num_anchors": 4, "anchor_steps": 15})
    consolidate = cfg.consolidate.model_copy(update={"steps": consolidate_steps})
    results = run_continual(
        "tiny10",
        list(DEMO_METHODS),
        out,
        progress,
        say,
        orders=1,
        name="demo",
        learn=learn.model_dump(),
        consolidate=consolidate.model_dump(),
        prompts_per_concept=4,
        class_images=4,
        sample={"steps": 12, "guidance": 5.0},
    )
    lib = Path(out) / "demo" / "fl2t" / "order0" / "state" / "library"
    print(
        f'fl2t library with all ten concepts: {lib}  (try: fl2t generate --library {lib} "a <c-stripestar> star in the style of <s-pastel>")'
    )
    return results
