"""`fl2t bench speed`: what the method costs, measured in one run on one machine.

Four measurements, each against G, the number of concepts in a library:
- generation time per image: the plain base model; FL2TPipeline (alpha, gamma once per prompt, the update fused
  into the weights once, sampling at the base model's speed); per-step multi-LoRA in the manner of CIDM (the same
  alpha, gamma, but all G experts evaluated by hooks at every denoising step); diffusers' `set_adapters` with G
  peft adapters;
- Step 2 (consolidation): time per step, time to the first step (loading, prompt encoding) and peak memory;
- Step 1: training throughput and peak memory, the tiny world on this machine, SD-1.5 size where CUDA is;
- the memory of a loaded library: its stacked low-rank factors, and the process's resident-memory growth.

Experts are synthetic (random LoRA factors on the layers Step 1 adapts, random embeddings and anchors): the cost
of every step depends on shapes, not on what the weights learned. Times are medians over repeats after warm-up;
the variants of a row are interleaved repeat by repeat (in alternating order), so a noisy neighbour slows them
alike, and a ratio to the base model is the median of the per-repeat ratios.

The measuring instruments are in `fl2t.bench.measure`, the generation benchmark in `fl2t.bench.speed_generation`;
this module holds the settings, the other benchmarks, the targets, the whole run and the tables.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl2t.bench.measure import (
    MB,
    PeakMemory,
    adapted_layers,
    device_peak_tflops,
    layer_bytes,
    linear_fit,
    machine,
    median,
    mfu,
    release_freed_memory,
    rss_bytes,
    synthetic_experts,
    unet_train_flops,
)
from fl2t.bench.speed_generation import bench_generation
from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.errors import Fl2tError
from fl2t.library import Library

Say = Callable[[str], None]
RATIO_TARGET = 1.05  # generation with the consolidated library at most this times the base model's time
OVERHEAD_TARGET = 1.05  # a learn_expert step at most this times a plain diffusers + peft loop step
LINEAR_TOLERANCE = 0.15  # "linear in G": every measured point within this share of the straight-line fit
# "far below G dense updates": Step 2's peak memory grows per concept by at most this share of one dense ΔW
MEMORY_TARGET = 0.25


@dataclass
class SpeedSettings:
    """What `fl2t bench speed` measures and how often. Sizes are numbers of concepts G."""

    base: str | None = None  # hub id or local diffusers folder; default: the tiny world's base model
    generate_sizes: list[int] = field(default_factory=lambda: [1, 10, 100])
    consolidate_sizes: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 50, 100])
    repeats: int = 5  # timed repetitions per measurement (median reported)
    warmup: int = 1  # untimed calls before them
    steps: int = 20  # denoising steps per image
    guidance: float = 7.5
    consolidate_steps: int = 6  # Step-2 steps per G; the first is warm-up
    train_steps: int = 8  # Step-1 steps on the tiny world; the first is warm-up
    train_batch_size: int = 1
    sd15_steps: int = 10  # Step-1 steps at SD-1.5 size (CUDA only); the first is warm-up
    sd15_batch_size: int = 1
    overhead_steps: int = 30  # Step-1 steps of learn_expert and of the plain diffusers + peft loop, interleaved
    rank: int = 4  # rank of the synthetic experts
    diffusers_max: int = 100  # largest G tried with diffusers' set_adapters
    peak_tflops: float | None = None  # the accelerator's peak, for MFU; default: looked up by device name
    seed: int = 0

    def check(self) -> None:
        if not self.generate_sizes or not self.consolidate_sizes:
            raise Fl2tError("--sizes and --consolidate-sizes need at least one G each")
        if min(self.generate_sizes + self.consolidate_sizes) < 1:
            raise Fl2tError("sizes are numbers of concepts: give integers >= 1")
        counts = (self.repeats, self.steps, self.train_batch_size, self.sd15_batch_size, self.rank)
        if min(counts) < 1 or self.warmup < 0:
            raise Fl2tError("--repeats, --steps and the batch sizes must be >= 1, --warmup >= 0")
        if self.overhead_steps < 4:
            raise Fl2tError("--overhead-steps must be >= 4 (the first two of each loop are warm-up)")
        for name in ("consolidate_steps", "train_steps", "sd15_steps"):
            if getattr(self, name) < 2:
                raise Fl2tError(f"--{name.replace('_', '-')} must be >= 2 (the first step is warm-up)")


def parse_sizes(text: str, option: str) -> list[int]:
    """'1,10,100' -> [1, 10, 100] (sorted, no duplicates)."""
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise Fl2tError(f"{option} {text!r}: give numbers of concepts separated by commas, e.g. 1,10,100") from None
    if not sizes or sizes[0] < 1:
        raise Fl2tError(f"{option} {text!r}: give numbers of concepts >= 1, e.g. 1,10,100")
    return sizes


# -- Step 2 and library memory -------------------------------------------------------------------------------------
def bench_library_memory(
    libraries: dict[int, Library], sizes: list[int], unet: nn.Module, dense_per_expert: int
) -> list[dict]:
    """Load each library's experts and stack their factors as Step 2 and inference do; bytes against G."""
    from fl2t.consolidate import canonical
    from fl2t.fusion import stack_experts

    rows = []
    for G in sizes:
        release_freed_memory()
        before = rss_bytes()
        experts = canonical(libraries[G].experts())
        stack = stack_experts(experts, unet)
        after = rss_bytes()
        stacked = sum(t.numel() * t.element_size() for d in (stack.A, stack.B) for t in d.values())
        rows.append(
            {
                "G": G,
                "stacked_factor_bytes": stacked,
                "rss_delta_bytes": None if before is None else after - before,
                "dense_bytes": G * dense_per_expert,
            }
        )
        del experts, stack
    return rows


def bench_consolidation(
    libraries: dict[int, Library],
    sizes: list[int],
    settings: SpeedSettings,
    base: str,
    dense_per_expert: int,
    say: Say,
) -> list[dict]:
    """A few Step-2 steps per G with the real training loop; the consolidated model is saved for generation."""
    from fl2t.consolidate import consolidate

    # Warm-up, not recorded: the first consolidation of a process pays one-time costs (lazy imports, allocator).
    consolidate(libraries[sizes[0]], ConsolidateSettings(relevance="learned", steps=2, seed=settings.seed), base=base)
    return [_consolidation_row(libraries[G], G, settings, base, dense_per_expert, say) for G in sizes]


def _consolidation_row(
    lib: Library, G: int, settings: SpeedSettings, base: str, dense_per_expert: int, say: Say
) -> dict:
    """Step 2 on the library of G concepts: time per step after the first, time to the first step, peak memory of
    both phases. The consolidated model is saved for generation."""
    from fl2t.consolidate import consolidate

    say(f"  Step 2, G={G}: {settings.consolidate_steps} steps")
    ends: list[float] = []
    with PeakMemory() as mem:

        def on_step(i: int, loss: float) -> None:
            ends.append(time.perf_counter())
            if i == 0:
                mem.mark()  # phase 0: loading, prompt encoding, first step; phase 1: the steps after it

        start = time.perf_counter()
        cs = ConsolidateSettings(relevance="learned", steps=settings.consolidate_steps, seed=settings.seed)
        model = consolidate(lib, cs, base=base, on_step=on_step)
    lib.save_consolidated(model.save_pretrained)
    del model
    step_times = [b - a for a, b in zip(ends, ends[1:])]
    return {
        "G": G,
        "step_s": {"median": median(step_times), "times": step_times},
        "to_first_step_s": ends[0] - start,
        "peak_rss_setup_bytes": mem.rss[0],
        "peak_rss_steps_bytes": mem.rss[1],
        "peak_cuda_setup_bytes": mem.cuda[0],
        "peak_cuda_steps_bytes": mem.cuda[1],
        "dense_bytes": G * dense_per_expert,
    }


def peak_bytes(row: dict) -> int | None:
    """A Step-2 row's peak memory over both phases: CUDA allocations where present, else resident memory."""
    key = "peak_cuda" if row["peak_cuda_steps_bytes"] is not None else "peak_rss"
    phases = [row[f"{key}_setup_bytes"], row[f"{key}_steps_bytes"]]
    return None if None in phases else max(phases)


# -- Step 1 --------------------------------------------------------------------------------------------------------
def bench_training(pipe: Any, concept: Any, learn: LearnSettings, label: str, count_flops: bool = False) -> dict:
    """Step-1 throughput with the real training loop (which uses up `pipe`): median step time after the first,
    peak memory after the first step."""
    from fl2t.experts import learn_expert
    from fl2t.models import resolution_of

    ends: list[float] = []
    with PeakMemory() as mem:

        def on_step(i: int, loss: float) -> None:
            ends.append(time.perf_counter())
            if i == 0:
                mem.mark()

        learn_expert(concept, pipe, learn, on_step=on_step)
    step_times = [b - a for a, b in zip(ends, ends[1:])]
    step_s = median(step_times)
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    row = {
        "world": label,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
        "resolution": learn.resolution or resolution_of(pipe),
        "batch_size": learn.batch_size,
        "mixed_precision": learn.mixed_precision,
        "gradient_checkpointing": learn.gradient_checkpointing,
        "step_s": {"median": step_s, "times": step_times},
        "steps_per_s": 1.0 / step_s,
        "images_per_s": learn.batch_size / step_s,
        "peak_rss_bytes": mem.rss[1],
        "peak_cuda_bytes": mem.cuda[1],
        "note": "",
    }
    if count_flops:
        row["flops_per_step"] = unet_train_flops(pipe, learn)
    return row


def bench_step1(settings: SpeedSettings, base: str, workdir: Path, say: Say) -> list[dict]:
    """Step 1 on a world concept: the tiny world's base here; SD-1.5 size with and without gradient checkpointing
    where CUDA is (a row saying so where it is not)."""
    from fl2t.data import load_concept
    from fl2t.models import load_base
    from fl2t.world import CONCEPTS
    from fl2t.world.concepts import write_concept

    concept = load_concept(write_concept(CONCEPTS[0], workdir / "concepts"))
    say(f"  Step 1, tiny world: {settings.train_steps} steps")
    common = dict(num_anchors=0, checkpoint_every=0, seed=settings.seed)
    learn = LearnSettings(steps=settings.train_steps, batch_size=settings.train_batch_size, **common)
    label = "tiny world" if settings.base is None else f"base {Path(base).name}"
    rows = [bench_training(load_base(base), concept, learn, label)]
    label = "SD-1.5 (512x512, bf16, SDPA)"
    for checkpointing in (False, True):
        if not torch.cuda.is_available():
            rows.append({"world": label, "gradient_checkpointing": checkpointing, "note": "no CUDA: not measured"})
            continue
        rows.append(_sd15_row(settings, concept, common, label, checkpointing, say))
        release_freed_memory()
        torch.cuda.empty_cache()
    return rows


def bench_overhead(settings: SpeedSettings, base: str, workdir: Path, say: Say) -> list[dict]:
    """`learn_expert`'s step time against a plain diffusers + peft loop's (bench/step1_overhead.py): on the tiny
    world here; where CUDA is, also at SD-1.5 size (random init, 512x512, bf16) at batch 1 and 4, and batch 4 with
    gradient checkpointing."""
    from fl2t.bench.step1_overhead import bench_step1_overhead
    from fl2t.data import load_concept
    from fl2t.models import sd15_random_pipeline
    from fl2t.world import CONCEPTS
    from fl2t.world.concepts import write_concept

    concept = load_concept(write_concept(CONCEPTS[0], workdir / "concepts"))
    learn = LearnSettings(steps=settings.overhead_steps, batch_size=settings.train_batch_size, seed=settings.seed)
    label = "tiny world" if settings.base is None else f"base {Path(base).name}"
    rows = [{"world": label, **bench_step1_overhead(base, concept, learn)}]
    if not torch.cuda.is_available():
        return rows
    sd15 = workdir / "sd15"
    sd15_random_pipeline(seed=settings.seed).save_pretrained(sd15, safe_serialization=True)
    for batch, checkpointing in ((1, False), (4, False), (4, True)):
        say(f"  overhead at SD-1.5 size: batch {batch}, gradient checkpointing {'on' if checkpointing else 'off'}")
        update = {"resolution": 512, "mixed_precision": "bf16", "batch_size": batch}
        learn = learn.model_copy(update={**update, "gradient_checkpointing": checkpointing})
        try:
            rows.append({"world": "SD-1.5 size", **bench_step1_overhead(str(sd15), concept, learn)})
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"world": "SD-1.5 size", "batch_size": batch, "note": str(e).splitlines()[0][:200]})
        release_freed_memory()
        torch.cuda.empty_cache()
    return rows


def _sd15_row(settings: SpeedSettings, concept: Any, common: dict, label: str, checkpointing: bool, say: Say) -> dict:
    """Step 1 at SD-1.5 size on a randomly initialised SD-1.5 (CUDA only), with attention processor and MFU."""
    from fl2t.models import sd15_random_pipeline

    say(
        f"  Step 1, SD-1.5 size, gradient checkpointing {'on' if checkpointing else 'off'}: {settings.sd15_steps} steps"
    )
    learn = LearnSettings(
        steps=settings.sd15_steps,
        batch_size=settings.sd15_batch_size,
        resolution=512,
        mixed_precision="bf16",
        gradient_checkpointing=checkpointing,
        **common,
    )
    try:
        pipe = sd15_random_pipeline(seed=settings.seed)
        row = bench_training(pipe, concept, learn, label, count_flops=True)
        processor = next(iter(pipe.unet.attn_processors.values()))
        row["attention"] = type(processor).__name__
        peak = device_peak_tflops(settings.peak_tflops)
        row["peak_tflops"] = peak
        row["mfu"] = mfu(row["flops_per_step"], row["steps_per_s"], peak)
        if peak is None:
            row["note"] = "MFU: peak of this device unknown; pass --peak-tflops"
    except torch.cuda.OutOfMemoryError as e:
        note = f"out of memory: {str(e).splitlines()[0]}"[:200]
        row = {"world": label, "gradient_checkpointing": checkpointing, "note": note}
    return row


# -- targets -------------------------------------------------------------------------------------------------------
def targets(results: dict) -> list[dict]:
    """The issue's targets, each with whether it holds on this run's numbers."""
    out = [_generation_target(row) for row in results["generation"]["rows"]]
    out += _consolidation_targets(results["consolidation"], results["layers"]["dense_bytes_per_expert"])
    out.append(_inference_target(results["generation"]["rows"]))
    for row in results["training"].get("overhead", []):
        if "ratio" not in row:
            continue
        where = f"{row['world']}, batch {row['batch_size']}, {row['mixed_precision']}"
        where += ", gradient checkpointing" if row.get("gradient_checkpointing") else ""
        out.append(
            {
                "target": f"a Step-1 step <= {OVERHEAD_TARGET}x a plain diffusers + peft loop's ({where})",
                "holds": row["ratio"] <= OVERHEAD_TARGET,
                "measured": f"{row['ratio']:.3f}x ({row['fl2t_step_s']['median'] * 1e3:.1f} ms against "
                f"{row['plain_step_s']['median'] * 1e3:.1f} ms, median of {row['steps']} interleaved steps)",
            }
        )
    return out


def _generation_target(row: dict) -> dict:
    measured = f"{row['fl2t_ratio']:.3f}x (A/A control, a second copy of the base: {row['base_copy_ratio']:.3f}x)"
    return {
        "target": f"generation with the consolidated library <= {RATIO_TARGET}x base, G={row['G']}",
        "holds": row["fl2t_ratio"] <= RATIO_TARGET,
        "measured": measured,
    }


def _consolidation_targets(cons: dict, dense: int) -> list[dict]:
    """Step 2: time per step and time to the first step linear in G, peak memory far below G dense updates."""
    rows = cons["rows"]
    fit, fit0, fitm = cons["fit_step_s"], cons["fit_to_first_step_s"], cons.get("fit_peak_bytes")
    step_measured = (
        f"slope {fit['slope'] * 1e3:.3f} ms/concept, intercept {fit['intercept'] * 1e3:.1f} ms, R² {fit['r2']:.3f}, "
        f"largest residual {fit['max_rel_residual']:.0%} (needs <= {LINEAR_TOLERANCE:.0%}, >= 3 sizes)"
    )
    first_measured = (
        f"slope {fit0['slope']:.3f} s/concept, R² {fit0['r2']:.3f}, largest residual {fit0['max_rel_residual']:.0%}"
    )
    if fitm is None:
        memory_measured = "not measurable here"
    else:
        memory_measured = (
            f"peak grows {fitm['slope'] / MB:.2f} MB per concept (R² {fitm['r2']:.2f}); "
            f"one dense ΔW is {dense / MB:.2f} MB; "
            f"at G={rows[-1]['G']} peak {peak_bytes(rows[-1]) / MB:.0f} MB "
            f"vs {rows[-1]['dense_bytes'] / MB:.0f} MB dense"
        )
    return [
        {
            "target": "Step 2 time per step linear in G",
            "holds": fit["max_rel_residual"] <= LINEAR_TOLERANCE if len(rows) >= 3 else None,
            "measured": step_measured,
        },
        {
            "target": "Step 2 time to the first step (loading, prompt encoding) linear in G",
            "holds": fit0["max_rel_residual"] <= LINEAR_TOLERANCE if len(rows) >= 3 else None,
            "measured": first_measured,
        },
        {
            "target": (
                f"Step 2 memory far below G dense updates (grows by <= {MEMORY_TARGET:.0%} of a dense ΔW per concept)"
            ),
            "holds": None if fitm is None or len(rows) < 3 else fitm["slope"] <= MEMORY_TARGET * dense,
            "measured": memory_measured,
        },
    ]


def _inference_target(gen: list[dict]) -> dict:
    """No inference step whose cost grows with G: the fused pipeline never arms the experts' hooks."""
    armed = sum(r["fl2t_armed_steps"] for r in gen)
    worst = max(gen, key=lambda r: r["unet_step_fused_ratio"])
    measured = (
        f"experts' hooks armed at {armed} of the fused pipeline's denoising steps (per-step variant: "
        f"{sum(r['per_step_hooks_armed_steps'] for r in gen)}); "
        f"a fused UNet step <= {worst['unet_step_fused_ratio']:.3f}x the plain one at every G "
        f"(hooks armed: {gen[-1]['unet_step_hooks_ratio']:.3f}x at G={gen[-1]['G']})"
    )
    return {
        "target": "no inference step whose cost grows with G per denoising step",
        "holds": armed == 0 and worst["unet_step_fused_ratio"] <= RATIO_TARGET,
        "measured": measured,
    }


# -- the whole run -------------------------------------------------------------------------------------------------
def run_speed(settings: SpeedSettings, out: Path, say: Say = lambda s: None) -> dict:
    """Measure everything, write `out/results.json`, return the results."""
    from fl2t.models import base_config_hash, load_base

    settings.check()
    if settings.base is None:
        from fl2t.world import base_path

        base = str(base_path())
    else:
        base = settings.base
    if out.exists() and not out.is_dir():
        raise Fl2tError(f"--out {out}: is a file; give a folder for results.json")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "settings": {**asdict(settings), "base": base}}
    start = time.perf_counter()

    pipe = load_base(base)
    base_ref = {"id": base, "config_hash": base_config_hash(pipe)}
    sizes = sorted(set(settings.generate_sizes) | set(settings.consolidate_sizes))
    experts = synthetic_experts(pipe, base_ref, max(sizes), settings.rank, settings.seed)
    factors_per_expert, dense_per_expert = layer_bytes(pipe.unet, settings.rank)
    results["layers"] = {
        "adapted": len(adapted_layers(pipe.unet)),
        "factor_bytes_per_expert": factors_per_expert,
        "dense_bytes_per_expert": dense_per_expert,
    }

    with tempfile.TemporaryDirectory(prefix="fl2t-bench-speed-") as tmp:
        workdir = Path(tmp)
        say(f"writing {len(sizes)} libraries of synthetic experts (G = {', '.join(map(str, sizes))})")
        libraries = {}
        for G in sizes:
            lib = Library(workdir / f"library-{G}")
            for e in experts[:G]:
                lib.add(e)
            libraries[G] = lib

        say("library memory")
        memory = bench_library_memory(libraries, settings.consolidate_sizes, pipe.unet, dense_per_expert)
        results["library_memory"] = {"rows": memory}
        del pipe

        say("Step 2 (consolidation)")
        rows = bench_consolidation(libraries, settings.consolidate_sizes, settings, base, dense_per_expert, say)
        results["consolidation"] = _consolidation_results(rows)

        say("generation")
        results["generation"] = {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "rows": bench_generation(libraries, settings.generate_sizes, experts, settings, base, say),
        }

        say("Step 1 (training throughput)")
        results["training"] = {"rows": bench_step1(settings, base, workdir, say)}
        say(f"Step 1 against a plain diffusers + peft loop, interleaved: {settings.overhead_steps} steps each")
        results["training"]["overhead"] = bench_overhead(settings, base, workdir, say)

    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _consolidation_results(rows: list[dict]) -> dict:
    """Step 2's rows with straight-line fits against G: time per step, time to the first step, peak memory."""
    Gs = [r["G"] for r in rows]
    results = {
        "rows": rows,
        "fit_step_s": linear_fit(Gs, [r["step_s"]["median"] for r in rows]),
        "fit_to_first_step_s": linear_fit(Gs, [r["to_first_step_s"] for r in rows]),
    }
    if peak_bytes(rows[0]) is not None:
        results["fit_peak_bytes"] = linear_fit(Gs, [peak_bytes(r) for r in rows])
    return results


# -- printing ------------------------------------------------------------------------------------------------------
def tables(results: dict) -> list:
    """rich Tables of the results: generation, one denoising step, Step 2, library memory, Step 1, targets."""
    return [
        _generation_table(results),
        _unet_step_table(results),
        _consolidation_table(results),
        _memory_table(results),
        _training_table(results),
        _overhead_table(results),
        _targets_table(results),
    ]


def _s(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / MB:.1f}"


def _table(title: str, columns: tuple[str, ...], justify: str | None = "right", caption: str | None = None) -> Any:
    from rich.table import Table

    t = Table(title=title, caption=caption)
    for col in columns:
        if justify is None:
            t.add_column(col)
        else:
            t.add_column(col, justify=justify)
    return t


def _generation_table(results: dict) -> Any:
    gen = results["generation"]
    t = _table(
        f"generation: s per image, median of {results['settings']['repeats']} ({gen['steps']} steps, CFG); "
        "ratio to the base model: median of the per-repeat ratios (variants interleaved)",
        (
            "G",
            "base",
            "A/A: base copy",
            "fl2t fused",
            "ratio",
            "fl2t span",
            "ratio",
            "per-prompt work",
            "per-step hooks (CIDM-style)",
            "ratio",
            "diffusers set_adapters",
            "ratio",
            "adapters load s",
        ),
    )
    t.add_column("note")
    for r in gen["rows"]:
        d = r.get("diffusers_s")
        t.add_row(
            str(r["G"]),
            _s(r["base_s"]["median"]),
            f"{r['base_copy_ratio']:.3f}x",
            _s(r["fl2t_s"]["median"]),
            f"{r['fl2t_ratio']:.3f}x",
            _s(r["fl2t_span_s"]["median"]) if "fl2t_span_s" in r else "-",
            f"{r['fl2t_span_ratio']:.3f}x" if r.get("fl2t_span_ratio") else "-",
            _s(r["prompt_overhead_s"]["median"], 4),
            _s(r["per_step_hooks_s"]["median"]),
            f"{r['per_step_hooks_ratio']:.3f}x",
            _s(d["median"]) if d else "-",
            f"{r['diffusers_ratio']:.3f}x" if r["diffusers_ratio"] else "-",
            _s(r["diffusers_load_s"], 1),
            r["diffusers_note"],
        )
    return t


def _unet_step_table(results: dict) -> Any:
    u = _table(
        "one denoising step (a UNet call on the guidance batch, the same modules three ways), "
        f"median of {4 * results['settings']['repeats']}",
        ("G", "base weights ms", "fused update", "ratio", "experts' hooks armed (per-step multi-LoRA)", "ratio"),
    )
    for r in results["generation"]["rows"]:
        u.add_row(
            str(r["G"]),
            f"{r['unet_step_plain_s']['median'] * 1e3:.1f}",
            f"{r['unet_step_fused_s']['median'] * 1e3:.1f}",
            f"{r['unet_step_fused_ratio']:.3f}x",
            f"{r['unet_step_hooks_s']['median'] * 1e3:.1f}",
            f"{r['unet_step_hooks_ratio']:.3f}x",
        )
    return u


def _consolidation_table(results: dict) -> Any:
    cons = results["consolidation"]
    fit = cons["fit_step_s"]
    c = _table(
        "Step 2 (consolidation): time and peak memory against G",
        ("G", "s/step", "s to first step", "peak MB (setup)", "peak MB (steps)", "G dense ΔW MB", "peak / dense"),
        caption=f"s/step = {fit['slope'] * 1e3:.3f} ms x G + {fit['intercept'] * 1e3:.1f} ms (R² {fit['r2']:.3f})",
    )
    key = "peak_cuda" if cons["rows"][0]["peak_cuda_steps_bytes"] is not None else "peak_rss"
    for r in cons["rows"]:
        peak = peak_bytes(r)
        c.add_row(
            str(r["G"]),
            _s(r["step_s"]["median"]),
            _s(r["to_first_step_s"], 2),
            _mb(r[f"{key}_setup_bytes"]),
            _mb(r[f"{key}_steps_bytes"]),
            _mb(r["dense_bytes"]),
            "-" if peak is None else f"{peak / r['dense_bytes']:.2f}",
        )
    return c


def _memory_table(results: dict) -> Any:
    m = _table(
        "a loaded library: memory against G",
        ("G", "stacked factors MB", "process RSS delta MB", "G dense ΔW MB", "factors / dense"),
    )
    for r in results["library_memory"]["rows"]:
        m.add_row(
            str(r["G"]),
            _mb(r["stacked_factor_bytes"]),
            _mb(r["rss_delta_bytes"]),
            _mb(r["dense_bytes"]),
            f"{r['stacked_factor_bytes'] / r['dense_bytes']:.3f}",
        )
    return m


def _training_table(results: dict) -> Any:
    tr = _table(
        "Step 1: training throughput",
        ("world", "device", "res", "batch", "precision", "grad ckpt", "steps/s", "images/s", "peak MB", "MFU", "note"),
        justify=None,
    )
    for r in results["training"]["rows"]:
        ckpt = "yes" if r["gradient_checkpointing"] else "no"
        if "steps_per_s" not in r:
            tr.add_row(r["world"], "-", "-", "-", "-", ckpt, "-", "-", "-", "-", r["note"])
            continue
        peak = r["peak_cuda_bytes"] if r["peak_cuda_bytes"] is not None else r["peak_rss_bytes"]
        tr.add_row(
            r["world"],
            r["device"],
            str(r["resolution"]),
            str(r["batch_size"]),
            r["mixed_precision"],
            ckpt,
            _s(r["steps_per_s"], 2),
            _s(r["images_per_s"], 2),
            _mb(peak),
            f"{r['mfu']:.1%}" if r.get("mfu") else "-",
            r["note"],
        )
    return tr


def _overhead_table(results: dict) -> Any:
    t = _table(
        "Step 1 against a plain diffusers + peft loop, interleaved (median ms per step)",
        ("world", "batch", "precision", "grad ckpt", "fl2t", "plain", "ratio", "note"),
        justify=None,
    )
    for r in results["training"].get("overhead", []):
        if "ratio" not in r:
            t.add_row(r["world"], str(r["batch_size"]), "-", "-", "-", "-", "-", r["note"])
            continue
        t.add_row(
            r["world"],
            str(r["batch_size"]),
            r["mixed_precision"],
            "yes" if r["gradient_checkpointing"] else "no",
            f"{r['fl2t_step_s']['median'] * 1e3:.1f}",
            f"{r['plain_step_s']['median'] * 1e3:.1f}",
            f"{r['ratio']:.3f}",
            "",
        )
    return t


def _targets_table(results: dict) -> Any:
    tg = _table("targets", ("target", "holds", "measured"), justify=None)
    for r in results["targets"]:
        tg.add_row(r["target"], {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r["holds"]], r["measured"])
    return tg
