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
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.data import OBJECT_TEMPLATES, ConceptSpec
from fl2t.errors import Fl2tError
from fl2t.expert import Expert
from fl2t.library import Library

MB = 2**20
# Dense bf16 tensor-core peak (no sparsity) by device name, for model FLOPs utilisation; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
RATIO_TARGET = 1.05  # generation with the consolidated library at most this times the base model's time
LINEAR_TOLERANCE = 0.15  # "linear in G": every measured point within this share of the straight-line fit
MEMORY_TARGET = 0.25  # "far below G dense updates": Step 2's peak memory grows per concept by at most this share of one dense ΔW


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
    rank: int = 4  # rank of the synthetic experts
    diffusers_max: int = 100  # largest G tried with diffusers' set_adapters
    peak_tflops: float | None = None  # the accelerator's peak, for MFU; default: looked up by device name
    seed: int = 0

    def check(self) -> None:
        if not self.generate_sizes or not self.consolidate_sizes:
            raise Fl2tError("--sizes and --consolidate-sizes need at least one G each")
        if min(self.generate_sizes + self.consolidate_sizes) < 1:
            raise Fl2tError("sizes are numbers of concepts: give integers >= 1")
        if min(self.repeats, self.steps, self.train_batch_size, self.sd15_batch_size, self.rank) < 1 or self.warmup < 0:
            raise Fl2tError("--repeats, --steps and the batch sizes must be >= 1, --warmup >= 0")
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


# -- measuring -----------------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that resident memory is live memory."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc; keeps freed pages otherwise
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory (sampled by a thread every 2 ms) and peak CUDA allocation over a block, relative to
    the block's start, in phases: `mark()` starts a new phase. `rss[i]`, `cuda[i]`: bytes of phase i (None if
    not measurable)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.rss: list[int | None] = []
        self.cuda: list[int | None] = []

    def __enter__(self) -> "PeakMemory":
        release_freed_memory()
        self.start = rss_bytes()
        self._peak = self.start
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_bytes()
            if now is not None and now > self._peak:
                self._peak = now

    def mark(self) -> None:
        self._close_phase()
        self._peak = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _close_phase(self) -> None:
        now = rss_bytes()
        if now is not None and self._peak is not None:
            self._peak = max(self._peak, now)
        self.rss.append(None if self.start is None or self._peak is None else self._peak - self.start)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda.append(torch.cuda.max_memory_allocated() - self.cuda_start)
        else:
            self.cuda.append(None)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._close_phase()


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares y = slope * x + intercept, with R² and the largest residual relative to the fitted value."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 2:
        return {"slope": float("nan"), "intercept": float(y[0]) if len(y) else float("nan"), "r2": float("nan"), "max_rel_residual": 0.0}
    slope, intercept = np.polyfit(x, y, 1)
    fitted = slope * x + intercept
    ss_res, ss_tot = float(((y - fitted) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    rel = np.abs(y - fitted) / np.maximum(np.abs(fitted), 1e-12)
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "max_rel_residual": float(rel.max())}


# -- synthetic experts -----------------------------------------------------------------------------------------
def adapted_layers(unet: nn.Module) -> list[str]:
    """The UNet linear layers Step 1 adapts with its default settings, sorted."""
    from fl2t.experts import lora_target_regex

    rx = re.compile(lora_target_regex(LearnSettings()))
    return sorted(name for name, m in unet.named_modules() if isinstance(m, nn.Linear) and rx.fullmatch(name))


def synthetic_experts(pipe, base_ref: dict[str, str], n: int, rank: int, seed: int, n_anchors: int = 2) -> list[Expert]:
    """n experts with random rank-`rank` LoRA factors on the adapted layers, random token and stable embeddings and
    random anchor latents: the shapes of learned experts, for timing only."""
    gen = torch.Generator().manual_seed(seed)
    layers = adapted_layers(pipe.unet)
    d = pipe.text_encoder.config.hidden_size
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    class_words = ("ball", "box", "cup", "ring")
    width = max(3, len(str(n - 1)))
    experts = []
    for g in range(n):
        name = f"bench-{g:0{width}d}"
        spec = ConceptSpec(name=name, tokens=[f"<{name}>"], class_word=class_words[g % len(class_words)])
        lora = {}
        for m in layers:
            lin = pipe.unet.get_submodule(m)
            lora[f"{m}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=gen) / lin.in_features**0.5
            lora[f"{m}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=gen) * 0.01
        experts.append(
            Expert(
                spec=spec,
                lora=lora,
                token_embeddings=torch.randn(1, d, generator=gen) * 0.01,
                stable_embedding=torch.randn(d, generator=gen),
                anchors=torch.randn(n_anchors, channels, size, size, generator=gen),
                anchor_prompts=[OBJECT_TEMPLATES[i % len(OBJECT_TEMPLATES)].format(spec.subject) for i in range(n_anchors)],
                base=base_ref,
                settings=LearnSettings(rank=rank, num_anchors=n_anchors).model_dump(),
            )
        )
    return experts


def layer_bytes(unet: nn.Module, rank: int) -> tuple[int, int]:
    """(bytes of one expert's low-rank factors, bytes of one dense ΔW) over the adapted layers, fp32."""
    factors = dense = 0
    for m in adapted_layers(unet):
        lin = unet.get_submodule(m)
        factors += 4 * rank * (lin.in_features + lin.out_features)
        dense += 4 * lin.in_features * lin.out_features
    return factors, dense


# -- the measurements --------------------------------------------------------------------------------------------
def bench_library_memory(libraries: dict[int, Library], sizes: list[int], unet: nn.Module, dense_per_expert: int) -> list[dict]:
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
        rows.append({
            "G": G,
            "stacked_factor_bytes": stacked,
            "rss_delta_bytes": None if before is None else after - before,
            "dense_bytes": G * dense_per_expert,
        })
        del experts, stack
    return rows


def bench_consolidation(libraries: dict[int, Library], sizes: list[int], settings: SpeedSettings, base: str, dense_per_expert: int, say) -> list[dict]:
    """A few Step-2 steps per G with the real training loop; the consolidated model is saved for generation."""
    from fl2t.consolidate import consolidate, save_consolidated

    # Warm-up, not recorded: the first consolidation of a process pays one-time costs (lazy imports, allocator).
    consolidate(libraries[sizes[0]], ConsolidateSettings(steps=2, seed=settings.seed), base=base)
    rows = []
    for G in sizes:
        say(f"  Step 2, G={G}: {settings.consolidate_steps} steps")
        lib = libraries[G]
        ends: list[float] = []
        with PeakMemory() as mem:

            def on_step(i: int, loss: float) -> None:
                ends.append(time.perf_counter())
                if i == 0:
                    mem.mark()  # phase 0: loading, prompt encoding, first step; phase 1: the steps after it

            start = time.perf_counter()
            model, record = consolidate(lib, ConsolidateSettings(steps=settings.consolidate_steps, seed=settings.seed), base=base, on_step=on_step)
        save_consolidated(lib, model, record)
        del model
        step_times = [b - a for a, b in zip(ends, ends[1:])]
        rows.append({
            "G": G,
            "step_s": {"median": median(step_times), "times": step_times},
            "to_first_step_s": ends[0] - start,
            "peak_rss_setup_bytes": mem.rss[0],
            "peak_rss_steps_bytes": mem.rss[1],
            "peak_cuda_setup_bytes": mem.cuda[0],
            "peak_cuda_steps_bytes": mem.cuda[1],
            "dense_bytes": G * dense_per_expert,
        })
    return rows


def bench_generation(libraries: dict[int, Library], sizes: list[int], experts: list[Expert], settings: SpeedSettings, base: str, say) -> list[dict]:
    """Seconds per image for each G: base model, FL2TPipeline, per-step hooks (CIDM-style), diffusers set_adapters."""
    from fl2t.consolidate import consolidate, save_consolidated
    from fl2t.consolidate.pipeline import FL2TPipeline
    from fl2t.models import load_base
    from fl2t.pipeline import ExpertPipeline, diffusers_lora

    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = experts[0].spec.stable_prompt  # names one concept; every library has it
    call = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance)

    def image(pipe) -> Callable[..., Any]:
        def run(**kw):
            return pipe(prompt, generator=torch.Generator().manual_seed(settings.seed), **call, **kw)

        return run

    base_pipe = load_base(base, device=device)
    rows = []
    for G in sizes:
        lib = libraries[G]
        if not (lib.path / "consolidated").is_dir():
            say(f"  G={G}: consolidating (1 step; speed does not depend on training)")
            save_consolidated(lib, *consolidate(lib, ConsolidateSettings(steps=1, seed=settings.seed), base=base))
        fl2t = FL2TPipeline.from_pretrained(base, library=lib, device=device)
        agg = fl2t.aggregated

        def per_step_hooks(**kw):
            """All G experts, mixed by the same alpha and gamma, evaluated by hooks at every denoising step."""
            alpha, gamma = fl2t.weights_for(prompt)
            agg.set(alpha[None], None if gamma is None else gamma[None], shared=True)
            try:
                return ExpertPipeline.__call__(fl2t, prompt, generator=torch.Generator().manual_seed(settings.seed), **call, **kw)
            finally:
                agg.off()

        def prompt_overhead():
            """What FL2TPipeline adds per prompt, outside the sampling loop: alpha, gamma; fuse; unfuse."""
            alpha, gamma = fl2t.weights_for(prompt)
            agg.fuse(alpha, gamma, shared=True)
            agg.unfuse()

        def armed_steps(run: Callable[..., Any]) -> int:
            """Denoising steps at which the experts' hooks were armed, i.e. cost a term per expert at that step."""
            armed: list[bool] = []
            run(callback_on_step_end=lambda p, i, t, kw: (armed.append(agg.mix is not None), kw)[1])
            return sum(armed)

        variants: dict[str, Callable[[], Any]] = {
            "base": image(base_pipe),
            # A/A control: a second copy of the base model, loaded afresh like the FL2T pipeline. Its ratio to the
            # base is 1 up to what this machine cannot resolve (memory placement, neighbours).
            "base_copy": image(load_base(base, device=device)),
            "fl2t": image(fl2t),
            "per_step_hooks": per_step_hooks,
            "prompt_overhead": prompt_overhead,
        }
        fused_armed, hooks_armed = armed_steps(variants["fl2t"]), armed_steps(per_step_hooks)

        diffusers_note, diffusers_load_s, dpipe = "", None, None
        if G > settings.diffusers_max:
            diffusers_note = f"not run: G > --diffusers-max {settings.diffusers_max}"
        else:
            say(f"  G={G}: loading {G} adapters into diffusers")
            try:
                start = time.perf_counter()
                dpipe = ExpertPipeline(**load_base(base).components, requires_safety_checker=False)
                dpipe.set_progress_bar_config(disable=True)
                for e in experts[:G]:
                    dpipe.add_expert_tokens(e)
                    dpipe.load_lora_weights(diffusers_lora(e), adapter_name=e.name)
                dpipe.set_adapters([e.name for e in experts[:G]], adapter_weights=[1.0 / G] * G)
                dpipe.to(device)
                diffusers_load_s = time.perf_counter() - start
                variants["diffusers"] = image(dpipe)
            except Exception as e:  # a limit of diffusers/peft is a result to report, not a crash of the bench
                diffusers_note = _failure(e)
                dpipe = None

        say(f"  G={G}: timing {', '.join(variants)} ({settings.warmup} warm-up + {settings.repeats} repeats, {settings.steps} steps)")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(settings.warmup + settings.repeats):
            order = list(variants.items())
            for name, fn in order if rep % 2 == 0 else order[::-1]:  # no variant always runs first or last
                try:
                    t = timed(fn)
                except Exception as e:
                    if name != "diffusers":
                        raise
                    diffusers_note = _failure(e)
                    del variants[name], times[name]
                    continue
                if rep >= settings.warmup:
                    times[name].append(t)

        def ratio(name: str) -> float | None:
            """Median over repeats of this variant's time over the base model's time of the same repeat."""
            return median([t / b for t, b in zip(times[name], times["base"])]) if name in times else None

        steps = unet_step_times(fl2t, prompt, settings)
        row = {
            "G": G,
            **{f"{k}_s": {"median": median(v), "times": v} for k, v in times.items()},
            "base_copy_ratio": ratio("base_copy"),
            "fl2t_ratio": ratio("fl2t"),
            "per_step_hooks_ratio": ratio("per_step_hooks"),
            "diffusers_ratio": ratio("diffusers"),
            **{f"unet_step_{k}_s": {"median": median(v), "times": v} for k, v in steps.items()},
            "unet_step_fused_ratio": median([f / p for f, p in zip(steps["fused"], steps["plain"])]),
            "unet_step_hooks_ratio": median([h / p for h, p in zip(steps["hooks"], steps["plain"])]),
            "diffusers_load_s": diffusers_load_s,
            "diffusers_note": diffusers_note,
            "fl2t_armed_steps": fused_armed,
            "per_step_hooks_armed_steps": hooks_armed,
        }
        rows.append(row)
        agg.remove()
        fl2t = dpipe = None  # free this row's pipelines before the next row loads its own
        variants.clear()
        release_freed_memory()
    return rows


def unet_step_times(fl2t, prompt: str, settings: SpeedSettings) -> dict[str, list[float]]:
    """One denoising step (a UNet call on the guidance batch) of the same pipeline, three ways, interleaved: the base
    weights (`plain`), the prompt's update fused into them (`fused`), the experts' hooks armed (`hooks`). The same
    modules serve all three, so only the per-step work differs. Four times as many repeats as for whole images."""
    agg = fl2t.aggregated
    device = fl2t.unet.device
    alpha, gamma = fl2t.weights_for(prompt)
    with torch.no_grad():
        cond, uncond = fl2t.encode_prompt(prompt, device, 1, True)
    states = torch.cat([uncond, cond])  # (2, T, D), as classifier-free guidance batches them
    size = fl2t.unet.config.sample_size
    gen = torch.Generator().manual_seed(settings.seed)
    latents = torch.randn(2, fl2t.unet.config.in_channels, size, size, generator=gen).to(device, fl2t.unet.dtype)
    t = torch.full((2,), 500, device=device)

    @torch.no_grad()
    def step() -> None:
        fl2t.unet(latents, t, states)

    times: dict[str, list[float]] = {"plain": [], "fused": [], "hooks": []}
    for rep in range(settings.warmup + 4 * settings.repeats):
        order = list(times) if rep % 2 == 0 else list(times)[::-1]
        for name in order:
            if name == "fused":
                agg.fuse(alpha, gamma, shared=True)
            elif name == "hooks":
                agg.set(alpha[None], None if gamma is None else gamma[None], shared=True)
            try:
                took = timed(step)
            finally:
                agg.unfuse()
                agg.off()
            if rep >= settings.warmup:
                times[name].append(took)
    return times


def _failure(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"failed: {type(e).__name__}: {first}"[:200]


def bench_training(pipe, concept, learn: LearnSettings, label: str, count_flops: bool = False) -> dict:
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
    row = {
        "world": label,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
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


def unet_train_flops(pipe, learn: LearnSettings) -> int:
    """FLOPs of one UNet forward and backward as Step 1 runs it (frozen base, LoRA gradients), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from fl2t.models import resolution_of

    unet = pipe.unet
    device, size = unet.device, (learn.resolution or resolution_of(pipe)) // pipe.vae_scale_factor
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(learn.mixed_precision, torch.float32)
    unet.disable_gradient_checkpointing()  # model FLOPs: without recomputation
    noisy = torch.randn(learn.batch_size, unet.config.in_channels, size, size, device=device)
    states = torch.randn(learn.batch_size, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device)
    t = torch.randint(0, 1000, (learn.batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(noisy.to(unet.dtype), t, states.to(unet.dtype)).sample
        out.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def bench_step1(settings: SpeedSettings, base: str, workdir: Path, say) -> list[dict]:
    """Step 1 on a world concept: the tiny world's base here; SD-1.5 size with and without gradient checkpointing
    where CUDA is (a row saying so where it is not)."""
    from fl2t.data import load_concept
    from fl2t.models import load_base, sd15_random_pipeline
    from fl2t.world import CONCEPTS
    from fl2t.world.concepts import write_concept

    concept = load_concept(write_concept(CONCEPTS[0], workdir / "concepts"))
    say(f"  Step 1, tiny world: {settings.train_steps} steps")
    common = dict(num_anchors=0, checkpoint_every=0, seed=settings.seed)
    rows = [bench_training(load_base(base), concept, LearnSettings(steps=settings.train_steps, batch_size=settings.train_batch_size, **common), "tiny world")]
    label = "SD-1.5 (512x512, bf16, SDPA)"
    for checkpointing in (False, True):
        if not torch.cuda.is_available():
            rows.append({"world": label, "gradient_checkpointing": checkpointing, "note": "no CUDA: not measured"})
            continue
        say(f"  Step 1, SD-1.5 size, gradient checkpointing {'on' if checkpointing else 'off'}: {settings.sd15_steps} steps")
        learn = LearnSettings(steps=settings.sd15_steps, batch_size=settings.sd15_batch_size, resolution=512, mixed_precision="bf16",
                              gradient_checkpointing=checkpointing, **common)
        try:
            pipe = sd15_random_pipeline(seed=settings.seed)
            row = bench_training(pipe, concept, learn, label, count_flops=True)
            processor = next(iter(pipe.unet.attn_processors.values()))
            row["attention"] = type(processor).__name__
            peak = settings.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
            row["peak_tflops"] = peak
            row["mfu"] = row["flops_per_step"] * row["steps_per_s"] / (peak * 1e12) if peak else None
            if peak is None:
                row["note"] = "MFU: peak of this device unknown; pass --peak-tflops"
        except torch.cuda.OutOfMemoryError as e:
            row = {"world": label, "gradient_checkpointing": checkpointing, "note": f"out of memory: {str(e).splitlines()[0]}"[:200]}
        rows.append(row)
        pipe = None
        release_freed_memory()
        torch.cuda.empty_cache()
    return rows


def peak_bytes(row: dict) -> int | None:
    """A Step-2 row's peak memory over both phases: CUDA allocations where present, else resident memory."""
    key = "peak_cuda" if row["peak_cuda_steps_bytes"] is not None else "peak_rss"
    phases = [row[f"{key}_setup_bytes"], row[f"{key}_steps_bytes"]]
    return None if None in phases else max(phases)


# -- targets -------------------------------------------------------------------------------------------------------
def targets(results: dict) -> list[dict]:
    """The issue's targets, each with whether it holds on this run's numbers."""
    out = []
    for row in results["generation"]["rows"]:
        out.append({
            "target": f"generation with the consolidated library <= {RATIO_TARGET}x base, G={row['G']}",
            "holds": row["fl2t_ratio"] <= RATIO_TARGET,
            "measured": f"{row['fl2t_ratio']:.3f}x (A/A control, a second copy of the base: {row['base_copy_ratio']:.3f}x)",
        })
    rows = results["consolidation"]["rows"]
    fit = results["consolidation"]["fit_step_s"]
    out.append({
        "target": "Step 2 time per step linear in G",
        "holds": fit["max_rel_residual"] <= LINEAR_TOLERANCE if len(rows) >= 3 else None,
        "measured": f"slope {fit['slope'] * 1e3:.3f} ms/concept, intercept {fit['intercept'] * 1e3:.1f} ms, R² {fit['r2']:.3f}, "
                    f"largest residual {fit['max_rel_residual']:.0%} (needs <= {LINEAR_TOLERANCE:.0%}, >= 3 sizes)",
    })
    fit0 = results["consolidation"]["fit_to_first_step_s"]
    out.append({
        "target": "Step 2 time to the first step (loading, prompt encoding) linear in G",
        "holds": fit0["max_rel_residual"] <= LINEAR_TOLERANCE if len(rows) >= 3 else None,
        "measured": f"slope {fit0['slope']:.3f} s/concept, R² {fit0['r2']:.3f}, largest residual {fit0['max_rel_residual']:.0%}",
    })
    fitm = results["consolidation"].get("fit_peak_bytes")
    dense = results["layers"]["dense_bytes_per_expert"]
    out.append({
        "target": f"Step 2 memory far below G dense updates (grows by <= {MEMORY_TARGET:.0%} of a dense ΔW per concept)",
        "holds": None if fitm is None or len(rows) < 3 else fitm["slope"] <= MEMORY_TARGET * dense,
        "measured": "not measurable here" if fitm is None else
                    f"peak grows {fitm['slope'] / MB:.2f} MB per concept (R² {fitm['r2']:.2f}); one dense ΔW is {dense / MB:.2f} MB; "
                    f"at G={rows[-1]['G']} peak {peak_bytes(rows[-1]) / MB:.0f} MB vs {rows[-1]['dense_bytes'] / MB:.0f} MB dense",
    })
    gen = results["generation"]["rows"]
    armed = sum(r["fl2t_armed_steps"] for r in gen)
    worst = max(gen, key=lambda r: r["unet_step_fused_ratio"])
    out.append({
        "target": "no inference step whose cost grows with G per denoising step",
        "holds": armed == 0 and worst["unet_step_fused_ratio"] <= RATIO_TARGET,
        "measured": f"experts' hooks armed at {armed} of the fused pipeline's denoising steps (per-step variant: "
                    f"{sum(r['per_step_hooks_armed_steps'] for r in gen)}); a fused UNet step <= {worst['unet_step_fused_ratio']:.3f}x "
                    f"the plain one at every G (hooks armed: {gen[-1]['unet_step_hooks_ratio']:.3f}x at G={gen[-1]['G']})",
    })
    return out


# -- the whole run -------------------------------------------------------------------------------------------------
def machine() -> dict:
    import diffusers
    import peft

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()
    return info


def run_speed(settings: SpeedSettings, out: Path, say: Callable[[str], None] = lambda s: None) -> dict:
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
        results["library_memory"] = {"rows": bench_library_memory(libraries, settings.consolidate_sizes, pipe.unet, dense_per_expert)}
        del pipe

        say("Step 2 (consolidation)")
        rows = bench_consolidation(libraries, settings.consolidate_sizes, settings, base, dense_per_expert, say)
        Gs = [r["G"] for r in rows]
        results["consolidation"] = {
            "rows": rows,
            "fit_step_s": linear_fit(Gs, [r["step_s"]["median"] for r in rows]),
            "fit_to_first_step_s": linear_fit(Gs, [r["to_first_step_s"] for r in rows]),
        }
        if peak_bytes(rows[0]) is not None:
            results["consolidation"]["fit_peak_bytes"] = linear_fit(Gs, [peak_bytes(r) for r in rows])

        say("generation")
        results["generation"] = {
            "steps": settings.steps,
            "guidance": settings.guidance,
            "rows": bench_generation(libraries, settings.generate_sizes, experts, settings, base, say),
        }

        say("Step 1 (training throughput)")
        results["training"] = {"rows": bench_step1(settings, base, workdir, say)}

    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


# -- printing ------------------------------------------------------------------------------------------------------
def tables(results: dict) -> list:
    """rich Tables of the results: generation, one denoising step, Step 2, library memory, Step 1, targets."""
    from rich.table import Table

    def s(x: float | None, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    def mb(x: int | None) -> str:
        return "-" if x is None else f"{x / MB:.1f}"

    gen = results["generation"]
    t = Table(title=f"generation: s per image, median of {results['settings']['repeats']} ({gen['steps']} steps, CFG); "
                    "ratio to the base model: median of the per-repeat ratios (variants interleaved)")
    for col in ("G", "base", "A/A: base copy", "fl2t fused", "ratio", "per-prompt work", "per-step hooks (CIDM-style)", "ratio",
                "diffusers set_adapters", "ratio", "adapters load s"):
        t.add_column(col, justify="right")
    t.add_column("note")
    for r in gen["rows"]:
        d = r.get("diffusers_s")
        t.add_row(str(r["G"]), s(r["base_s"]["median"]), f"{r['base_copy_ratio']:.3f}x", s(r["fl2t_s"]["median"]), f"{r['fl2t_ratio']:.3f}x",
                  s(r["prompt_overhead_s"]["median"], 4), s(r["per_step_hooks_s"]["median"]), f"{r['per_step_hooks_ratio']:.3f}x",
                  s(d["median"]) if d else "-", f"{r['diffusers_ratio']:.3f}x" if r["diffusers_ratio"] else "-", s(r["diffusers_load_s"], 1),
                  r["diffusers_note"])
    u = Table(title=f"one denoising step (a UNet call on the guidance batch, the same modules three ways), median of {4 * results['settings']['repeats']}")
    for col in ("G", "base weights ms", "fused update", "ratio", "experts' hooks armed (per-step multi-LoRA)", "ratio"):
        u.add_column(col, justify="right")
    for r in gen["rows"]:
        u.add_row(str(r["G"]), f"{r['unet_step_plain_s']['median'] * 1e3:.1f}", f"{r['unet_step_fused_s']['median'] * 1e3:.1f}",
                  f"{r['unet_step_fused_ratio']:.3f}x", f"{r['unet_step_hooks_s']['median'] * 1e3:.1f}", f"{r['unet_step_hooks_ratio']:.3f}x")
    cons = results["consolidation"]
    fit = cons["fit_step_s"]
    c = Table(title="Step 2 (consolidation): time and peak memory against G",
              caption=f"s/step = {fit['slope'] * 1e3:.3f} ms x G + {fit['intercept'] * 1e3:.1f} ms (R² {fit['r2']:.3f})")
    key = "peak_cuda" if cons["rows"][0]["peak_cuda_steps_bytes"] is not None else "peak_rss"
    for col in ("G", "s/step", "s to first step", "peak MB (setup)", "peak MB (steps)", "G dense ΔW MB", "peak / dense"):
        c.add_column(col, justify="right")
    for r in cons["rows"]:
        peak = peak_bytes(r)
        c.add_row(str(r["G"]), s(r["step_s"]["median"]), s(r["to_first_step_s"], 2), mb(r[f"{key}_setup_bytes"]), mb(r[f"{key}_steps_bytes"]),
                  mb(r["dense_bytes"]), "-" if peak is None else f"{peak / r['dense_bytes']:.2f}")
    m = Table(title="a loaded library: memory against G")
    for col in ("G", "stacked factors MB", "process RSS delta MB", "G dense ΔW MB", "factors / dense"):
        m.add_column(col, justify="right")
    for r in results["library_memory"]["rows"]:
        m.add_row(str(r["G"]), mb(r["stacked_factor_bytes"]), mb(r["rss_delta_bytes"]), mb(r["dense_bytes"]), f"{r['stacked_factor_bytes'] / r['dense_bytes']:.3f}")
    tr = Table(title="Step 1: training throughput")
    for col in ("world", "device", "res", "batch", "precision", "grad ckpt", "steps/s", "images/s", "peak MB", "MFU", "note"):
        tr.add_column(col)
    for r in results["training"]["rows"]:
        if "steps_per_s" not in r:
            tr.add_row(r["world"], "-", "-", "-", "-", "yes" if r["gradient_checkpointing"] else "no", "-", "-", "-", "-", r["note"])
            continue
        peak = r["peak_cuda_bytes"] if r["peak_cuda_bytes"] is not None else r["peak_rss_bytes"]
        tr.add_row(r["world"], r["device"], str(r["resolution"]), str(r["batch_size"]), r["mixed_precision"], "yes" if r["gradient_checkpointing"] else "no",
                   s(r["steps_per_s"], 2), s(r["images_per_s"], 2), mb(peak), f"{r['mfu']:.1%}" if r.get("mfu") else "-", r["note"])
    tg = Table(title="targets")
    for col in ("target", "holds", "measured"):
        tg.add_column(col)
    for r in results["targets"]:
        tg.add_row(r["target"], {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r["holds"]], r["measured"])
    return [t, u, c, m, tr, tg]
