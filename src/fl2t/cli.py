"""The `fl2t` command line: thin; every command calls the library (`fl2t.learning` for learn, consolidate
and forget) and prints its result. Commands import the library in their bodies, so that `fl2t --help` and
usage errors do not wait for torch and diffusers to load.

Exit codes: 0 ok, 2 user error (one line on stderr), 1 internal error.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fl2t import console
from fl2t.bench.cli import app as bench_app
from fl2t.errors import Fl2tError
from fl2t.worldkit.cli import app as world_app

# Before transformers/diffusers are imported: keep their chatter off the user's terminal.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Plain click-style help: option types as words (N, FOLDER, RATE), flags without a type.
app = typer.Typer(
    help="Continual, order-agnostic personalization of text-to-image diffusion models (FL2T).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
library_app = typer.Typer(help="Inspect a library.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(library_app, name="library")
app.add_typer(world_app, name="world")
app.add_typer(bench_app, name="bench")


def _stdout() -> Console:
    """Tables on stdout: the terminal's width, or wide enough not to cut a cell when stdout is a file or a pipe."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def quiet_libraries() -> None:
    """Silence library warnings; our own progress bars and messages say what is happening."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@app.callback()
def _main(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and errors.")] = False) -> None:
    console.set_quiet(quiet)


# -- learn ------------------------------------------------------------------------------------------------
@app.command()
def learn(
    concept_dirs: Annotated[
        list[Path],
        typer.Argument(metavar="FOLDER", help="Concept folder(s): images, optional captions and concept.yaml."),
    ],
    library: Annotated[
        Path, typer.Option("--library", "-l", metavar="FOLDER", help="Library folder (created if missing).")
    ],
    base: Annotated[
        Optional[str],
        typer.Option(metavar="MODEL", help="Base model: hub id or local diffusers folder. Default: the library's."),
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option(metavar="FILE", help="YAML settings file (section 'learn:').")
    ] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps.", metavar="N")] = None,
    lr: Annotated[Optional[float], typer.Option(metavar="RATE", help="LoRA learning rate.")] = None,
    embedding_lr: Annotated[
        Optional[float], typer.Option(metavar="RATE", help="Token embedding learning rate.")
    ] = None,
    rank: Annotated[Optional[int], typer.Option(metavar="R", help="LoRA rank.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step.", metavar="N")] = None,
    resolution: Annotated[
        Optional[int], typer.Option(metavar="PIXELS", help="Training image size (default: the base model's).")
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.", metavar="N")] = None,
    layerwise: Annotated[
        Optional[bool],
        typer.Option("--layerwise/--no-layerwise", help="One token embedding per cross-attention layer."),
    ] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(metavar="no|fp16|bf16", help="Mixed precision.")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")
    ] = None,
    name: Annotated[Optional[str], typer.Option(metavar="NAME", help="Concept name (one folder only).")] = None,
    token: Annotated[
        Optional[list[str]], typer.Option(metavar="TOKEN", help="Concept token(s), repeatable (one folder only).")
    ] = None,
    class_word: Annotated[
        Optional[str], typer.Option(metavar="WORD", help="Class word, e.g. 'dog' (one folder only).")
    ] = None,
    kind: Annotated[Optional[str], typer.Option(metavar="object|style", help="Concept kind (one folder only).")] = None,
    replace: Annotated[bool, typer.Option(help="Relearn a concept whose name is already in the library.")] = False,
    checkpoint_every: Annotated[
        Optional[int], typer.Option(help="Save the training state every N steps (0: never).", metavar="N")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Finish an interrupted run: skip learned concepts, continue from checkpoints.")
    ] = False,
    data_parallel: Annotated[
        bool,
        typer.Option(
            help="Under torchrun/accelerate launch: all processes train each concept together (DDP) instead of one concept each."
        ),
    ] = False,
    consolidate_after: Annotated[
        bool,
        typer.Option("--consolidate/--no-consolidate", help="Consolidate the library's new set (Step 2) afterwards."),
    ] = True,
    learned: LearnedStep2 = None,
    accept: Accept = False,
    gate_threshold: GateThreshold = None,
    evaluator: Evaluator = None,
    references: References = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Learn concept expert(s) (Step 1) into a library, then consolidate the new set (Step 2).

    Under `torchrun` or `accelerate launch`, concept i is learned by process i % N; the main process writes.
    """
    from fl2t.config import load_settings
    from fl2t.learning import Learned
    from fl2t.learning import learn as learn_into
    from fl2t.parallel import process_state

    proc = process_state()
    if not proc.is_main_process:  # one terminal: only the main process draws bars and talks
        console.set_quiet(True)

    def report(x: Learned) -> None:
        if as_json:
            print(
                json.dumps(
                    {"concept": x.name, "tokens": x.tokens, "library": str(library), "content_hash": x.content_hash}
                )
            )
        else:
            print(f"learned {x.name} ({' '.join(x.tokens)}) into {library} [{x.content_hash[:12]}]")

    try:  # the main process reports a user error; the others exit with the same code quietly
        settings = load_settings(
            config,
            learn=dict(
                steps=steps,
                lr=lr,
                embedding_lr=embedding_lr,
                rank=rank,
                batch_size=batch_size,
                resolution=resolution,
                seed=seed,
                layerwise=layerwise,
                mixed_precision=mixed_precision,
                gradient_checkpointing=gradient_checkpointing,
                checkpoint_every=checkpoint_every,
            ),
            consolidate=dict(relevance=_relevance(learned)),
        )
        result = learn_into(
            concept_dirs,
            library,
            base=base,
            learn_settings=settings.learn,
            consolidate_settings=settings.consolidate,
            name=name,
            tokens=token,
            class_word=class_word,
            kind=kind,
            replace=replace,
            resume=resume,
            data_parallel=data_parallel,
            consolidate_after=consolidate_after,
            track=console.track,
            say=console.say,
            on_learned=report,
            accept=accept,
            evaluator=evaluator,
            references=references,
            **gate_option(gate_threshold),
        )
    except Fl2tError:
        if not proc.is_main_process:
            raise typer.Exit(2) from None
        raise
    if result.set_hash:
        h = result.set_hash
        print(
            json.dumps({"library": str(result.library), "set_hash": h})
            if as_json
            else f"consolidated {result.library} [{h[:12]}]"
        )
    if result.gate and not as_json:
        print(result.gate)
    if result.refused:
        raise typer.Exit(3)


# Options learn and consolidate share. The gate's default is fl2t.learning.GATE_THRESHOLD (a test checks the text).
LearnedStep2 = Annotated[
    Optional[bool],
    typer.Option(
        "--learned/--lookup",
        help="Step 2: train the proxies, decoder and relevance heads (the paper's), or the token lookup (default: "
        "each concept a prompt names at full weight; the learned Step 2 measured no better, BENCHMARKS.md).",
    ),
]
Accept = Annotated[bool, typer.Option(help="Make the consolidation current even if the fidelity gate refuses it.")]
GateThreshold = Annotated[
    Optional[float],
    typer.Option(metavar="DROP", help="Largest fidelity drop the gate allows per concept (default 0.5)."),
]
Evaluator = Annotated[
    Optional[str],
    typer.Option(
        metavar="CLIP",
        help="Also record each concept's IA and CA on its reference images in the new version: a CLIP by hub id or "
        "folder, or 'world' (the tiny world's).",
    ),
]
References = Annotated[
    Optional[Path],
    typer.Option(
        metavar="FOLDER",
        help="With --evaluator: a folder with each concept's reference images in a folder named by the concept "
        "(default on the built-in world: the world's concepts).",
    ),
]


def _relevance(learned: Optional[bool]) -> Optional[str]:
    return None if learned is None else ("learned" if learned else "lookup")


def gate_option(threshold: Optional[float]) -> dict[str, float]:
    """--gate-threshold for learn and consolidate: the library's default unless given."""
    return {} if threshold is None else {"gate_threshold": threshold}


# -- generate ---------------------------------------------------------------------------------------------
@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt, naming the concept by its token(s).")],
    library: Annotated[Path, typer.Option("--library", "-l", metavar="PATH")],
    concept: Annotated[
        Optional[list[str]],
        typer.Option(help="Use these concepts' experts alone instead of the consolidated model.", metavar="TEXT"),
    ] = None,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Output PNG; with several images, -0, -1, ... are added.", metavar="PATH"),
    ] = Path("out.png"),
    base: Annotated[Optional[str], typer.Option(help="Override the library's base model.", metavar="TEXT")] = None,
    seed: Annotated[int, typer.Option(metavar="N")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.", metavar="N")] = 30,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.", metavar="X")] = 7.5,
    num_images: Annotated[int, typer.Option(min=1, metavar="N")] = 1,
    size: Annotated[Optional[int], typer.Option(help="Image size (default: the base model's).", metavar="N")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(metavar="TEXT")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Generate images with a library: its consolidated model, or named experts alone."""
    import torch

    from fl2t.consolidate.pipeline import FL2TPipeline
    from fl2t.pipeline import ExpertPipeline

    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise Fl2tError(f"-o {output}: give an image file name ending in .png, .jpg or .webp")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if concept:  # the named experts alone, as plain LoRAs
        pipe = ExpertPipeline.from_library(library, concept, base=base, device=device)
    else:  # the consolidated model: every concept of the library, chosen by the prompt
        pipe = FL2TPipeline.from_pretrained(base, library=library, device=device)
    with console.track("generate", steps * num_images) as update:
        images = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=num_images,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
            callback_on_step_end=lambda p, i, t, kw: (update((i + 1) * num_images), kw)[1],
        ).images
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = (
        [output]
        if len(images) == 1
        else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(images))]
    )
    for im, p in zip(images, paths):
        im.save(p)
    print(json.dumps({"images": [str(p) for p in paths], "seed": seed}) if as_json else "\n".join(map(str, paths)))


# -- export -----------------------------------------------------------------------------------------------
@app.command()
def export(
    library: Annotated[Path, typer.Option("--library", "-l", metavar="PATH")],
    concept: Annotated[str, typer.Option(help="Concept to export.", metavar="TEXT")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the exported files.", metavar="PATH")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="diffusers|kohya",
            help="diffusers: a diffusers LoRA and textual-inversion files; kohya: the LoRA and embedding files "
            "AUTOMATIC1111 and ComfyUI load.",
        ),
    ] = "diffusers",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export a concept's expert for plain diffusers, or for AUTOMATIC1111 and ComfyUI (--format kohya)."""
    from fl2t.export import export_expert
    from fl2t.learning import open_library

    out = export_expert(open_library(library).expert(concept), output, format=format)  # type: ignore[arg-type]
    print(
        json.dumps(
            {"export": str(out), "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}
        )
        if as_json
        else out
    )


# -- library ----------------------------------------------------------------------------------------------
@library_app.command("show")
def library_show(
    library: Annotated[Path, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List a library's concepts."""
    from fl2t.learning import open_library

    lib = open_library(library)
    records = lib.records()
    fidelity = lib.fidelity()
    if as_json:
        print(
            json.dumps(
                {
                    "base": lib.base,
                    "experts": {n: r.model_dump() for n, r in records.items()},
                    "version": lib.manifest().version,
                    "fidelity": fidelity,
                },
                indent=2,
            )
        )
        return
    table = Table(
        title=f"{lib.path}  (base {lib.base['id'] if lib.base else '-'}, version {lib.manifest().version or '-'})"
    )
    for col in ("concept", "tokens", "class", "kind", "rank", "layer-wise", "steps", "fidelity", "hash"):
        table.add_column(col)
    for n, r in records.items():
        table.add_row(
            n,
            " ".join(r.tokens),
            r.class_word,
            r.kind,
            str(r.rank),
            "yes" if r.layerwise else "no",
            str(r.settings.get("steps", "")),
            f"{fidelity[n]:.3f}" if n in fidelity else "-",
            r.content_hash[:12],
        )
    _stdout().print(table)


@library_app.command("history")
def library_history(
    library: Annotated[Path, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List a library's versions: number, time, what changed, the set's hash, each concept's fidelity."""
    from fl2t.learning import open_library

    lib = open_library(library)
    current = lib.manifest().version
    versions = lib.versions()
    if as_json:
        rows = [{**v.model_dump(mode="json"), "current": v.number == current} for v in versions]
        print(json.dumps({"library": str(lib.path), "current": current, "versions": rows}, indent=2))
        return
    table = Table(title=f"{lib.path}  (current: version {current or '-'})")
    for col in ("version", "time", "change", "concepts", "set", "fidelity", "IA / CA"):
        table.add_column(col)
    for v in versions:
        mark = " (current)" if v.number == current else " (candidate)" if v.candidate else ""
        scores = " ".join(f"{n} {f:.3f}" for n, f in sorted(v.fidelity.items())) or "-"
        measured = " ".join(f"{n} {m['ia']:.3f}/{m['ca']:.2f}" for n, m in sorted(v.evaluation.items())) or "-"
        row = (f"{v.number}{mark}", v.time, v.change, str(len(v.experts)), v.set_hash[:12], scores, measured)
        table.add_row(*row)
    _stdout().print(table)


@library_app.command("rollback")
def library_rollback(
    library: Annotated[Path, typer.Argument()],
    version: Annotated[
        int, typer.Argument(metavar="N", help="The version to make current (see `fl2t library history`).")
    ],
) -> None:
    """Make an earlier version of a library current again, byte for byte."""
    from fl2t.learning import open_library

    v = open_library(library).rollback(version)
    print(f"{library}: version {v.number} ({v.change}) is current")


@library_app.command("gc")
def library_gc(
    library: Annotated[Path, typer.Argument()],
    keep: Annotated[
        int, typer.Option(metavar="K", help="How many of the newest versions to keep (the current one always).")
    ],
) -> None:
    """Drop a library's old versions and the files only they used."""
    from fl2t.learning import open_library

    dropped = open_library(library).gc(keep)
    print(f"{library}: dropped {len(dropped)} version(s)" + (f" ({', '.join(map(str, dropped))})" if dropped else ""))


@library_app.command("check")
def library_check(
    library: Annotated[Path, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Verify every file of a library against its recorded hashes and schema."""
    from fl2t.learning import open_library

    lib = open_library(library)
    problems = lib.check()
    if as_json:
        print(json.dumps({"library": str(lib.path), "ok": not problems, "problems": problems}, indent=2))
    else:
        for p in problems:
            print(f"problem: {p}")
        print(
            f"{lib.path}: "
            + (f"{len(problems)} problem(s) found" if problems else f"ok, {len(lib.names())} concept(s) verified")
        )
    if problems:
        raise typer.Exit(2)


# -- consolidate, inspect, forget ---------------------------------------------------------------------------
@app.command()
def consolidate(
    library: Annotated[Path, typer.Option("--library", "-l", metavar="PATH")],
    base: Annotated[Optional[str], typer.Option(help="Override the library's base model.", metavar="TEXT")] = None,
    config: Annotated[
        Optional[Path], typer.Option(help="YAML settings file (section 'consolidate:').", metavar="PATH")
    ] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps.", metavar="N")] = None,
    lr: Annotated[Optional[float], typer.Option(metavar="X")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Mixed with the set's hash.", metavar="N")] = None,
    gates: Annotated[
        Optional[bool], typer.Option("--gates/--no-gates", help="Per-rank feature-selection gates.")
    ] = None,
    shared: Annotated[
        Optional[bool], typer.Option("--shared/--no-shared", help="Shared LoRA learned in Step 2.")
    ] = None,
    contrastive: Annotated[
        Optional[bool], typer.Option("--contrastive/--no-contrastive", help="InfoNCE prompt-proxy term.")
    ] = None,
    proxy_attention: Annotated[
        Optional[bool], typer.Option("--proxy-attention/--no-proxy-attention", help="Self-attention among proxies.")
    ] = None,
    routing: Annotated[
        Optional[bool],
        typer.Option("--routing/--no-routing", help="Routing term on the relevance weights (off: lambda_route 0)."),
    ] = None,
    learned: LearnedStep2 = None,
    accept: Accept = False,
    gate_threshold: GateThreshold = None,
    evaluator: Evaluator = None,
    references: References = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Consolidate a library's experts (Step 2) into LIB/consolidated/, as a new version with each concept's
    fidelity; exit 3 when the fidelity gate keeps it as a candidate instead. By default the token lookup (nothing
    trained); --learned trains the paper's Step 2 (--steps, --gates, ... apply to it)."""
    from fl2t.config import load_settings
    from fl2t.learning import FidelityDropped, consolidate_library, gate_line, open_library

    settings = load_settings(
        config,
        consolidate=dict(
            relevance=_relevance(learned),
            steps=steps,
            lr=lr,
            seed=seed,
            gates=gates,
            shared=shared,
            contrastive=contrastive,
            proxy_attention=proxy_attention,
            lambda_route=None if routing in (None, True) else 0.0,
        ),
    ).consolidate
    given = [f"--{k}" for k, v in (("steps", steps), ("lr", lr), ("routing", routing)) if v is not None]
    if settings.relevance == "lookup" and given:
        raise Fl2tError(f"{', '.join(given)}: the token lookup trains nothing; add --learned for the learned Step 2")
    try:
        h = consolidate_library(
            library,
            settings,
            base=base,
            track=console.track,
            accept=accept,
            evaluator=evaluator,
            references=references,
            **gate_option(gate_threshold),
        )
    except FidelityDropped as refused:
        print(f"fl2t: refused: {refused}", file=sys.stderr)
        raise typer.Exit(3) from None
    print(json.dumps({"library": str(library), "set_hash": h}) if as_json else f"consolidated {library} [{h[:12]}]")
    if not as_json:
        print(gate_line(open_library(library)))


@app.command()
def inspect(
    prompt: Annotated[str, typer.Argument()],
    library: Annotated[Path, typer.Option("--library", "-l", metavar="PATH")],
    base: Annotated[Optional[str], typer.Option(help="Override the library's base model.", metavar="TEXT")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Per-layer weights as JSON.")] = False,
) -> None:
    """Show which concepts a prompt selects, per UNet block."""
    from fl2t.consolidate.pipeline import FL2TPipeline

    pipe = FL2TPipeline.from_pretrained(base, library=library)
    rel = pipe.relevance(prompt)
    if as_json:
        print(json.dumps(rel, indent=2))
        return
    blocks: dict[str, list[dict[str, float]]] = {}
    for layer, weights in rel.items():
        blocks.setdefault(".".join(layer.split(".")[:3]), []).append(weights)  # e.g. down_blocks.0.attentions
    table = Table(title=f"concept weights per block: {prompt!r}")
    table.add_column("block")
    for n in [*pipe.concept_names, "none"]:
        table.add_column(n, justify="right")
    for block, rows in blocks.items():
        table.add_row(block, *(f"{sum(r[n] for r in rows) / len(rows):.2f}" for n in [*pipe.concept_names, "none"]))
    _stdout().print(table)


@app.command()
def forget(
    name: Annotated[str, typer.Argument(help="Concept to remove.")],
    library: Annotated[Path, typer.Option("--library", "-l", metavar="PATH")],
    consolidate_after: Annotated[
        bool, typer.Option("--consolidate/--no-consolidate", help="Re-consolidate the remaining set.")
    ] = True,
    config: Annotated[
        Optional[Path], typer.Option(help="YAML settings file (section 'consolidate:').", metavar="PATH")
    ] = None,
) -> None:
    """Remove a concept from a library and re-consolidate the rest."""
    from fl2t.config import load_settings
    from fl2t.learning import forget as forget_concept

    settings = load_settings(config).consolidate
    h = forget_concept(name, library, settings, consolidate_after=consolidate_after, track=console.track)
    print(f"forgot {name}")
    if h:
        print(f"consolidated {library} [{h[:12]}]")


# -- ui ---------------------------------------------------------------------------------------------------
@app.command()
def ui(
    library: Annotated[
        Path, typer.Option("--library", "-l", metavar="FOLDER", help="Library folder (created by the first learn).")
    ] = Path("fl2t-library"),
    base: Annotated[
        Optional[str],
        typer.Option(metavar="MODEL", help="Base model: hub id or local diffusers folder. Default: the library's."),
    ] = None,
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="Address to serve on; other than 127.0.0.1 only when asked.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="N", help="Port to serve on.")] = 7860,
    config: Annotated[
        Optional[Path], typer.Option(metavar="FILE", help="YAML settings file (sections 'learn:', 'consolidate:').")
    ] = None,
) -> None:
    """Open the web app for a library: cards, learning with live progress, generation, benchmark reports."""
    from fl2t.ui import launch

    launch(library, base=base, host=host, port=port, config=config, say=console.say)


# -- demo -------------------------------------------------------------------------------------------------
@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Runs folder; the demo writes OUT/demo/ (a rerun skips finished work).", metavar="PATH")
    ] = Path("runs"),
    processes: Annotated[
        int | None,
        typer.Option(
            min=1, max=2, help="Processes of one thread each (default: 2 on a machine with two cores).", metavar="N"
        ),
    ] = None,
) -> None:
    """Run the main job end to end on the built-in default: three tiny-world concepts, four methods, the report
    (benchmark config `demo`)."""
    from fl2t.demo import run_demo

    run_demo(out, progress=console.progress, say=console.say, processes=processes)


def main() -> None:
    quiet_libraries()
    try:
        rv = app(standalone_mode=False, prog_name="fl2t")
    except Fl2tError as e:
        # One line, whatever a path holds: control characters are shown escaped, never sent to the terminal.
        msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(e))
        print(f"fl2t: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("fl2t: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # A usage error (unknown command or option, bad value): typer vendors its own click, whose exception
        # classes are not importable by a public name, so they are known by what they do: show usage, exit 2.
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("FL2T_DEBUG"):
            raise
        print(f"fl2t: internal error: {type(e).__name__}: {e} (set FL2T_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
