"""`fl2t world ...`: build, locate, check the tiny world and write its concept folders."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="The tiny world: a miniature text-to-image world that runs on a CPU.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
console = Console(width=140)


@app.command()
def build(
    out: Path = typer.Option(
        None, "--out", help="Folder to build into (default: the package's shipped weights).", metavar="PATH"
    ),
    seed: int = typer.Option(None, help="Seed of the whole build (default: the shipped world's seed).", metavar="N"),
    resume: bool = typer.Option(False, help="Load stages whose output already exists instead of training them."),
    until: str = typer.Option(
        "dino", help="Stop after this stage: vae, base, evaluator or dino (the last; v2 only).", metavar="TEXT"
    ),
    threads: int = typer.Option(2, help="Torch threads; 1 is faster while other jobs load the machine.", metavar="N"),
    jobs: int = typer.Option(
        1,
        help="2: train the VAE and base model in one process and the evaluator and DINO-like encoder in another, "
        "each with half the threads (the same weights, sooner).",
        metavar="N",
    ),
    v2: bool = typer.Option(
        True,
        "--v2/--v1",
        help="World v2 (shipped since 2026-12-05): two-object scenes and generic styles in every stage's mix, and a "
        "DINO-like encoder; --v1: the world shipped before, byte for byte.",
    ),
) -> None:
    """Render the world and train its VAE, base model and evaluator (v2: and DINO-like encoder) from nothing (about an
    hour on 2 cores)."""
    from fl2t.worldkit.build import DEFAULT_SEED, V2_MIX, WEIGHTS_DIR, BuildSettings
    from fl2t.worldkit.build import build as run_build

    t0 = time.time()
    settings = BuildSettings(seed=DEFAULT_SEED if seed is None else seed, threads=threads, **(V2_MIX if v2 else {}))
    manifest = run_build(out or WEIGHTS_DIR, settings, resume, until, jobs)
    where = manifest.parent if manifest else (out or WEIGHTS_DIR)
    console.print(f"built {where} in {(time.time() - t0) / 60:.1f} min")


@app.command()
def path(evaluator: bool = typer.Option(False, help="Print the evaluator's folder instead.")) -> None:
    """Print the folder of the shipped base pipeline (loadable with StableDiffusionPipeline.from_pretrained)."""
    from fl2t.world import base_path, evaluator_path

    typer.echo(str(evaluator_path() if evaluator else base_path()))


@app.command()
def concepts(out: Path = typer.Argument(..., help="Folder to write one sub-folder per concept into.")) -> None:
    """Write the world's concept folders (images, captions, concept.yaml) in the format `fl2t learn` reads."""
    from fl2t.world import write_concepts

    for folder in write_concepts(out):
        typer.echo(str(folder))


@app.command()
def check(
    weights: Path = typer.Option(None, help="A built world folder (default: the shipped weights).", metavar="PATH"),
    guidance: float = typer.Option(
        5.0, help="Classifier-free guidance scale for the base model's samples.", metavar="X"
    ),
    steps: int = typer.Option(25, help="DDIM steps for the base model's samples.", metavar="N"),
    grid: Path = typer.Option(
        None, help="Also save PNG grids of the samples (base model, learned concept) into this folder.", metavar="PATH"
    ),
    threads: int = typer.Option(2, help="Torch threads; 1 is faster while other jobs load the machine.", metavar="N"),
    full: bool = typer.Option(
        False,
        "--full",
        help="Also measure forgetting over three Step-1 seeds and learn every concept alone (about 12 more minutes).",
    ),
) -> None:
    """Measure the world against its gates and print the table; exit 1 if a gate fails."""
    from fl2t.images import image_grid
    from fl2t.worldkit.build import WEIGHTS_DIR
    from fl2t.worldkit.check import run_checks

    t0 = time.time()
    rows, ctx = run_checks(weights or WEIGHTS_DIR, guidance_scale=guidance, steps=steps, threads=threads, full=full)
    table = Table(title=f"tiny world check ({time.time() - t0:.0f} s)")
    for col in ("gate", "value", "needs", "", "detail"):
        table.add_column(col)
    for r in rows:
        mark = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
        table.add_row(r.gate, f"{r.value:.3f}", r.needs, mark, r.detail)
    console.print(table)
    console.print("seconds per gate: " + ", ".join(f"{k} {v:.0f}" for k, v in ctx.seconds.items()))
    if grid:
        grid.mkdir(parents=True, exist_ok=True)
        for key, images in ctx.samples.items():
            path = grid / f"{key.replace(' ', '-')}.png"
            image_grid(images[:64], columns=8).save(path)
            console.print(f"samples: {path}")
    if not all(r.passed for r in rows):
        raise typer.Exit(1)
