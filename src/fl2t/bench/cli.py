"""`fl2t bench continual`, `fl2t bench tune`, `fl2t bench jobs` and `fl2t bench speed`: thin; each calls its module."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="Benchmarks: the continual protocol (quality) and speed.", no_args_is_help=True, rich_markup_mode=None
)


@app.command()
def speed(
    out: Path = typer.Option(Path("runs/bench-speed"), "--out", help="Folder for results.json.", metavar="PATH"),
    base: str = typer.Option(
        None, help="Base model: hub id or local diffusers folder (default: the tiny world's).", metavar="TEXT"
    ),
    sizes: str = typer.Option("1,10,100", help="Library sizes G for generation, comma-separated.", metavar="TEXT"),
    consolidate_sizes: str = typer.Option(
        "2,5,10,20,50,100", help="Library sizes G for Step 2 and library memory.", metavar="TEXT"
    ),
    repeats: int = typer.Option(5, help="Timed repetitions per measurement (the median is reported).", metavar="N"),
    warmup: int = typer.Option(1, help="Untimed calls before the timed ones.", metavar="N"),
    steps: int = typer.Option(20, help="Denoising steps per image.", metavar="N"),
    consolidate_steps: int = typer.Option(6, help="Step-2 steps per G (the first is warm-up).", metavar="N"),
    train_steps: int = typer.Option(8, help="Step-1 steps on the tiny world (the first is warm-up).", metavar="N"),
    train_batch_size: int = typer.Option(1, help="Images per Step-1 step on the tiny world.", metavar="N"),
    sd15_steps: int = typer.Option(
        10, help="Step-1 steps at SD-1.5 size, CUDA only (the first is warm-up).", metavar="N"
    ),
    sd15_batch_size: int = typer.Option(1, help="Images per Step-1 step at SD-1.5 size.", metavar="N"),
    overhead_steps: int = typer.Option(
        30, help="Step-1 steps of fl2t's loop and of a plain diffusers + peft loop, interleaved.", metavar="N"
    ),
    diffusers_max: int = typer.Option(100, help="Largest G tried with diffusers' set_adapters.", metavar="N"),
    peak_tflops: float = typer.Option(
        None, help="The accelerator's peak bf16 TFLOP/s for MFU (default: looked up by name).", metavar="X"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the tables."),
) -> None:
    """Generation, Step 2, Step 1 and library memory against the number of concepts G; writes results.json."""

    from rich.console import Console

    from fl2t.bench.speed import SpeedSettings, parse_sizes, run_speed, tables
    from fl2t.console import say

    settings = SpeedSettings(
        base=base,
        generate_sizes=parse_sizes(sizes, "--sizes"),
        consolidate_sizes=parse_sizes(consolidate_sizes, "--consolidate-sizes"),
        repeats=repeats,
        warmup=warmup,
        steps=steps,
        consolidate_steps=consolidate_steps,
        train_steps=train_steps,
        train_batch_size=train_batch_size,
        sd15_steps=sd15_steps,
        sd15_batch_size=sd15_batch_size,
        diffusers_max=diffusers_max,
        overhead_steps=overhead_steps,
        peak_tflops=peak_tflops,
    )
    results = run_speed(settings, out, say=say)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    console = Console(width=200)
    for table in tables(results):
        console.print(table)
    console.print(f"results: {out / 'results.json'} ({results['wall_s']:.0f} s)")


@app.command()
def continual(
    config: str = typer.Option(
        "tiny10", "--config", "-c", help="Benchmark YAML, or a built-in: tiny10, cifc, dreambooth.", metavar="TEXT"
    ),
    methods: str = typer.Option(
        "fl2t,merge,sequential,oracle",
        help="Comma-separated: oracle, lookup, lookup+span, sequential, ewc, lwf, c-lora, merge, magmax, magmax-alone, cidm, cidm+tokens, fl2t, or a variant of the config.",
        metavar="TEXT",
    ),
    orders: int = typer.Option(None, help="Number of task orders (default: the config's).", metavar="N"),
    data: Path = typer.Option(
        None, help="Folder the config's concept paths are relative to (your local copy of the data).", metavar="PATH"
    ),
    base: str = typer.Option(
        None, help="Base model: hub id or local diffusers folder (default: the config's).", metavar="TEXT"
    ),
    out: Path = typer.Option(
        Path("runs"),
        "--out",
        help="Runs folder; results go to OUT/<name>/ (reruns skip finished work).",
        metavar="PATH",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the table."),
    shard: str = typer.Option(
        None,
        help="Do one shard K/N of the work (a job array: one command per shard, the same --out); "
        "then run with --report.",
        metavar="K/N",
    ),
    report: bool = typer.Option(False, "--report", help="Only write the report of the finished work (after shards)."),
) -> None:
    """The continual protocol: after each task, score every concept learned so far; table, report.md/html.

    Under torchrun or accelerate launch the work is spread over the ranks (rank 0 writes the report)."""
    from fl2t.bench.continual import run_continual
    from fl2t.bench.jobs import parse_shard
    from fl2t.console import progress, say

    run_continual(
        config,
        [m.strip() for m in methods.split(",") if m.strip()],
        out,
        progress,
        say,
        as_json=as_json,
        orders=orders,
        data=str(data) if data else None,
        base=base,
        shard=parse_shard(shard) if shard else None,
        report_only=report,
    )


@app.command()
def tune(
    config: str = typer.Option(
        "tune", "--config", "-c", help="Tuning config: a YAML file with a grid, or the built-in tune.", metavar="TEXT"
    ),
    methods: str = typer.Option(
        None, help="Comma-separated methods whose grid to run (default: every method of the grid).", metavar="TEXT"
    ),
    out: Path = typer.Option(
        Path("runs"),
        "--out",
        help="Runs folder; results and tuned.yaml go to OUT/<name>/ (reruns skip finished work).",
        metavar="PATH",
    ),
) -> None:
    """Choose each method's main settings on the tuning-only concepts: every grid point as a variant in one
    benchmark run; per method the best final average nIA (ties: the lower nIA forgetting); writes tuned.yaml."""
    from fl2t.bench.tune import run_tune
    from fl2t.console import progress, say

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    run_tune(config, chosen, out, progress, say)


@app.command()
def jobs(
    run: Path = typer.Argument(help="A benchmark's run folder: OUT/<name>.", metavar="FOLDER"),
    as_json: bool = typer.Option(False, "--json", help="Print the claims as JSON."),
) -> None:
    """Who holds which part of a spread benchmark, and how far it is."""
    from rich.console import Console
    from rich.table import Table

    from fl2t.bench.jobs import Claims
    from fl2t.errors import Fl2tError

    if not (run / "run.json").is_file():
        raise Fl2tError(f"{run}: not a benchmark run folder (no run.json)")
    rows = Claims(run / "jobs", "viewer").table()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{run}: {len(rows)} claimed unit(s)")
    for col in ("unit", "owner", "state", "progress", "host", "pid", "updated"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in ("unit", "owner", "state", "progress", "host", "pid", "updated")))
    Console(width=160).print(table)
