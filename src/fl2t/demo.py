"""`fl2t demo`: the first table a user sees, from the built-in benchmark config `demo` (benchmarks/demo.yaml).

Three tiny-world concepts (two objects, one style) learned one task at a time at tiny10's full Step-1 budget, by
`oracle` (each concept's own expert: the ceiling), `lookup` (the same experts chosen by trigger word, nothing
trained: what `fl2t learn` does by default), `fl2t` (the paper's learned Step 2), `cidm+tokens` (CIDM with token-driven aggregation, tiny10's strongest baseline) and `lwf` (one LoRA continued
task after task, the strongest plain continual LoRA: it shows forgetting); every concept learned so far is generated
and scored after every task, the report is written, and a short reading of the numbers is printed.

The work runs as two processes of one thread each (the benchmark's shards, claiming units through the run
folder): lwf, the longest unit, in a second process, the shared experts and the other four methods in this one.
On two cores that is what fits the demo into its 10 minutes (two one-thread processes did the old demo in 41%
less time than one process of two threads, BENCHMARKS.md). One thread per process also makes the numbers the same
whether one process or two do the work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fl2t.errors import Fl2tError

PARTS = (("oracle", "lookup", "fl2t", "cidm+tokens"), ("lwf",))  # this process's methods, the second process's
METHODS = tuple(m for part in PARTS for m in part)


def run_demo(
    out: Path,
    progress: Callable[[], Any] | None,
    say: Callable[[str], None],
    processes: int | None = None,
    **overrides: Any,
) -> dict:
    """Run the demo into `out/demo/` (a rerun skips finished work), print its tables, the reading and where the
    library is; return the results. `processes`: 1 or 2 (default: 2 where the machine has two cores).
    `overrides` replace top-level keys of the demo config (tests use a tiny budget)."""
    import torch

    from fl2t.bench.continual import Benchmark, load_config, run_continual

    cfg = load_config("demo", orders=1, **overrides)
    if processes is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = min(2, cores)
    names = [c if isinstance(c, str) else c.path for c in cfg.concepts]
    say(
        f"[bold]fl2t demo[/bold]: the tiny world's {', '.join(names)} "
        f"learned one task at a time ({cfg.learn.steps} Step-1 steps each) by {', '.join(METHODS)}; every concept "
        f"learned so far is scored after each task; {processes} process(es) of one thread"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = Benchmark(cfg, out, list(PARTS[0]), progress=progress, say=say)  # writes the concepts and run record
        if processes == 1:
            here.run()
            _part(overrides, PARTS[1], out)
        else:
            log = here.out / "second-process.log"
            with log.open("w") as f:  # a fresh interpreter, one thread: `python -m fl2t.demo ARGS`
                args = json.dumps({"overrides": overrides, "methods": PARTS[1], "out": str(out), "shard": [1, 2]})
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                other = subprocess.Popen([sys.executable, "-m", "fl2t.demo", args], stdout=f, stderr=f, env=env)
                try:
                    here.run(shard=(0, 2))
                    if other.poll() is None:
                        say(f"waiting for {', '.join(PARTS[1])} in the second process")
                    other.wait()
                finally:
                    if other.poll() is None:  # this process failed or was interrupted: stop the other one too
                        other.terminate()
                        other.wait()
            if other.returncode != 0:
                tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
                raise Fl2tError(f"the demo's second process ({', '.join(PARTS[1])}) failed: {tail[0]} (log: {log})")
    finally:
        torch.set_num_threads(threads)
    results = run_continual("demo", list(METHODS), out, progress, say, report_only=True, orders=1, **overrides)
    print(" ".join(reading(results)))
    lib = Path(out) / cfg.name / "fl2t" / "order0" / "state" / "library"
    print(f'fl2t library with {len(names)} concepts: {lib}  (try: fl2t generate --library {lib} "{_example(cfg)}")')
    return results


def _part(
    overrides: dict[str, Any], methods: Sequence[str], out: Path | str, shard: Sequence[int] | None = None
) -> None:
    """One process's share of the demo: `methods` on the demo config, with one thread."""
    import torch

    from fl2t.bench.continual import Benchmark, load_config

    torch.set_num_threads(1)
    cfg = load_config("demo", orders=1, **overrides)
    Benchmark(cfg, Path(out), list(methods), progress=None, say=lambda text: None).run(
        None if shard is None else tuple(shard)
    )


def reading(results: dict) -> list[str]:
    """The demo's numbers in words, generated from the results: how well the concepts were learned (the oracle),
    then each other method's final nIA and CA with their forgetting, and the two highest, with whether the paired
    comparison (`results["comparisons"]`, printed above it by the benchmark) shows the lead."""
    methods, names = results["methods"], results["concepts"]
    lines = ["Reading:"]
    oracle = methods.get("oracle")
    if oracle is not None:
        learned = [n for n in names if (oracle["per_concept"][n]["ca"] or 0) >= 0.5]
        lines.append(
            f"each concept's own expert (oracle, the ceiling) reaches nIA {_f(oracle['average']['nia'])} and CA "
            f"{_f(oracle['average']['ca'])}; {len(learned)} of {len(names)} concepts are recognised in at least half "
            f"their images ({', '.join(learned) or 'none'})."
        )
    others = [m for m in methods if m != "oracle"]
    for m in others:
        r = methods[m]
        lines.append(
            f"{m}: final nIA {_f(r['average']['nia'])}, CA {_f(r['average']['ca'])}, forgetting "
            f"{_f(r['forgetting']['nia'])} nIA / {_f(r['forgetting']['ca'])} CA"
            + (f", two concepts in one prompt {_f(r['multi'])} nIA." if r.get("multi") is not None else ".")
        )
    scored = sorted(
        (m for m in others if methods[m]["average"]["nia"] is not None), key=lambda m: -methods[m]["average"]["nia"]
    )
    if len(scored) > 1:
        best, second = scored[:2]
        pair = next(
            (c for c in results.get("comparisons", []) if c["metric"] == "nia" and {c["a"], c["b"]} == {best, second}),
            None,
        )
        if pair is None:
            verdict = "no paired comparison of the two"
        elif pair["ci"][0] > 0 or pair["ci"][1] < 0:
            verdict = "a lead the paired interval shows"
        else:
            verdict = "not a lead: the paired interval of the difference includes 0"
        lines.append(f"Highest final nIA without the oracle: {best}, then {second}; {verdict}.")
    return lines


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _example(cfg: Any) -> str:
    """A prompt naming the demo's first multi-concept pair with the config's template (or its first concept)."""
    from fl2t.world import get_concept

    if not cfg.multi:
        first = cfg.concepts[0]
        return f"a {get_concept(first if isinstance(first, str) else first.path).subject}"
    pair = sorted((get_concept(n) for n in cfg.multi[0]), key=lambda c: c.kind != "object")
    return cfg.multi_prompts["+".join(c.kind for c in pair)].format(*(c.subject for c in pair))


if __name__ == "__main__":  # the second process: `python -m fl2t.demo '{"overrides": ..., "methods": ..., ...}'`
    _part(**json.loads(sys.argv[1]))
