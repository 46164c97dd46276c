"""The measuring instruments of `fl2t bench speed`: timing (single calls, variants interleaved repeat by repeat, one
denoising step three ways), peak memory, model FLOPs and MFU, straight-line fits, the machine's description, and the
synthetic experts whose shapes the benchmarks time. The benchmarks themselves are in `fl2t.bench.speed`.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fl2t.config import LearnSettings
from fl2t.data import OBJECT_TEMPLATES, ConceptSpec
from fl2t.expert import Expert

if TYPE_CHECKING:
    from fl2t.bench.speed import SpeedSettings

MB = 2**20
# Dense bf16 tensor-core peak (no sparsity) by device name, for model FLOPs utilisation; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


# -- timing --------------------------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes, CUDA work included."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def failure_note(e: Exception) -> str:
    """A failed measurement, as a one-line note for the results."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"failed: {type(e).__name__}: {first}"[:200]


def interleaved_times(
    variants: dict[str, Callable[[], Any]], warmup: int, repeats: int, optional: Collection[str] = ()
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time every variant once per repeat, in alternating order (no variant always runs first or last), after
    `warmup` untimed rounds. A variant named in `optional` that raises is dropped from the later rounds and from
    the times, with a note; any other raises. Returns (seconds per variant, failure notes per dropped variant)."""
    live = dict(variants)
    times: dict[str, list[float]] = {k: [] for k in live}
    failures: dict[str, str] = {}
    for rep in range(warmup + repeats):
        order = list(live.items())
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            try:
                t = timed(fn)
            except Exception as e:
                if name not in optional:
                    raise
                failures[name] = failure_note(e)
                del live[name], times[name]
                continue
            if rep >= warmup:
                times[name].append(t)
    return times, failures


def unet_step_times(fl2t: Any, prompt: str, settings: SpeedSettings) -> dict[str, list[float]]:
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


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares y = slope * x + intercept, with R² and the largest residual relative to the fitted value."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 2:
        intercept = float(y[0]) if len(y) else float("nan")
        return {"slope": float("nan"), "intercept": intercept, "r2": float("nan"), "max_rel_residual": 0.0}
    slope, intercept = np.polyfit(x, y, 1)
    fitted = slope * x + intercept
    ss_res, ss_tot = float(((y - fitted) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    rel = np.abs(y - fitted) / np.maximum(np.abs(fitted), 1e-12)
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "max_rel_residual": float(rel.max())}


# -- memory --------------------------------------------------------------------------------------------------------
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

    def __enter__(self) -> PeakMemory:
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


# -- FLOPs and MFU -------------------------------------------------------------------------------------------------
def unet_train_flops(pipe: Any, learn: LearnSettings) -> int:
    """FLOPs of one UNet forward and backward as Step 1 runs it (frozen base, LoRA gradients), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from fl2t.models import resolution_of

    unet = pipe.unet
    device, size = unet.device, (learn.resolution or resolution_of(pipe)) // pipe.vae_scale_factor
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(learn.mixed_precision, torch.float32)
    unet.disable_gradient_checkpointing()  # model FLOPs: without recomputation
    noisy = torch.randn(learn.batch_size, unet.config.in_channels, size, size, device=device)
    states = torch.randn(
        learn.batch_size, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device
    )
    t = torch.randint(0, 1000, (learn.batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(noisy.to(unet.dtype), t, states.to(unet.dtype)).sample
        out.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def device_peak_tflops(override: float | None = None) -> float | None:
    """The CUDA device's dense bf16 peak in TFLOP/s: `override` if given, else looked up by the device's name
    (None if unknown)."""
    return override or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)


def mfu(flops_per_step: float, steps_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak; None if the peak is unknown."""
    return flops_per_step * steps_per_s / (peak_tflops * 1e12) if peak_tflops else None


# -- the machine ---------------------------------------------------------------------------------------------------
def machine() -> dict:
    """What the numbers were measured on: platform, threads, library versions, CUDA device, load average."""
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


# -- synthetic experts ---------------------------------------------------------------------------------------------
def adapted_layers(unet: nn.Module) -> list[str]:
    """The UNet linear layers Step 1 adapts with its default settings, sorted."""
    from fl2t.experts import lora_target_regex

    rx = re.compile(lora_target_regex(LearnSettings()))
    return sorted(name for name, m in unet.named_modules() if isinstance(m, nn.Linear) and rx.fullmatch(name))


def synthetic_experts(
    pipe: Any, base_ref: dict[str, str], n: int, rank: int, seed: int, n_anchors: int = 2
) -> list[Expert]:
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
        prompts = [OBJECT_TEMPLATES[i % len(OBJECT_TEMPLATES)].format(spec.subject) for i in range(n_anchors)]
        experts.append(
            Expert(
                spec=spec,
                lora=lora,
                token_embeddings=torch.randn(1, d, generator=gen) * 0.01,
                stable_embedding=torch.randn(d, generator=gen),
                anchors=torch.randn(n_anchors, channels, size, size, generator=gen),
                anchor_prompts=prompts,
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
