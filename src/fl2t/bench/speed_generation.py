"""`fl2t bench speed`, generation: seconds per image against G for the plain base model, FL2TPipeline (fused, and with
span-restricted keys/values), per-step
multi-LoRA in the manner of CIDM and diffusers' `set_adapters`, interleaved repeat by repeat; and one denoising step
three ways. The run, the other benchmarks and the printing are in `fl2t.bench.speed`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fl2t.bench.measure import failure_note, interleaved_times, median, release_freed_memory, unet_step_times
from fl2t.config import ConsolidateSettings
from fl2t.expert import Expert
from fl2t.library import Library

if TYPE_CHECKING:
    from fl2t.bench.speed import SpeedSettings

Say = Callable[[str], None]


def bench_generation(
    libraries: dict[int, Library], sizes: list[int], experts: list[Expert], settings: SpeedSettings, base: str, say: Say
) -> list[dict]:
    """Seconds per image for each G: base model, FL2TPipeline, per-step hooks (CIDM-style), diffusers set_adapters."""
    from fl2t.models import load_base

    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = experts[0].spec.stable_prompt  # names one concept; every library has it
    base_pipe = load_base(base, device=device)
    rows = []
    for G in sizes:
        rows.append(_generation_row(G, libraries[G], base_pipe, experts, prompt, settings, base, device, say))
        release_freed_memory()  # the row's pipelines are gone with its frame: free them before the next row loads
    return rows


def _generation_row(
    G: int,
    lib: Library,
    base_pipe: Any,
    experts: list[Expert],
    prompt: str,
    settings: SpeedSettings,
    base: str,
    device: str,
    say: Say,
) -> dict:
    """One row of the generation table: every variant timed on the library of G concepts."""
    from fl2t.consolidate.pipeline import FL2TPipeline
    from fl2t.models import load_base

    _ensure_consolidated(lib, G, settings, base, say)
    fl2t = FL2TPipeline.from_pretrained(base, library=lib, device=device)
    per_step_hooks, prompt_overhead = _fl2t_variants(fl2t, prompt, settings)
    variants: dict[str, Callable[[], Any]] = {
        "base": _image(base_pipe, prompt, settings),
        # A/A control: a second copy of the base model, loaded afresh like the FL2T pipeline. Its ratio to the
        # base is 1 up to what this machine cannot resolve (memory placement, neighbours).
        "base_copy": _image(load_base(base, device=device), prompt, settings),
        "fl2t": _image(fl2t, prompt, settings),
        # The same library with span-restricted keys/values (DESIGN §3, Inference): the named experts' key/value
        # update computed once per prompt batch and added at their tokens, the rest fused.
        "fl2t_span": _image(
            FL2TPipeline.from_pretrained(base, library=lib, device=device, span=True), prompt, settings
        ),
        "per_step_hooks": per_step_hooks,
        "prompt_overhead": prompt_overhead,
    }
    fused_armed = _armed_steps(fl2t.aggregated, variants["fl2t"])
    hooks_armed = _armed_steps(fl2t.aggregated, per_step_hooks)

    dpipe, diffusers_load_s, diffusers_note = _diffusers_pipeline(experts[:G], settings, base, device, say)
    if dpipe is not None:
        variants["diffusers"] = _image(dpipe, prompt, settings)

    say(
        f"  G={G}: timing {', '.join(variants)} "
        f"({settings.warmup} warm-up + {settings.repeats} repeats, {settings.steps} steps)"
    )
    times, failures = interleaved_times(variants, settings.warmup, settings.repeats, optional=("diffusers",))
    diffusers_note = failures.get("diffusers", diffusers_note)

    def ratio(name: str) -> float | None:
        """Median over repeats of this variant's time over the base model's time of the same repeat."""
        return median([t / b for t, b in zip(times[name], times["base"])]) if name in times else None

    steps = unet_step_times(fl2t, prompt, settings)
    row = {
        "G": G,
        **{f"{k}_s": {"median": median(v), "times": v} for k, v in times.items()},
        "base_copy_ratio": ratio("base_copy"),
        "fl2t_ratio": ratio("fl2t"),
        "fl2t_span_ratio": ratio("fl2t_span"),
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
    fl2t.aggregated.remove()
    return row


def _call_kwargs(settings: SpeedSettings) -> dict[str, Any]:
    return dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance)


def _image(pipe: Any, prompt: str, settings: SpeedSettings) -> Callable[..., Any]:
    """One image of `prompt` from `pipe`, with the bench's steps, guidance and seed."""
    call = _call_kwargs(settings)

    def run(**kw: Any) -> Any:
        return pipe(prompt, generator=torch.Generator().manual_seed(settings.seed), **call, **kw)

    return run


def _ensure_consolidated(lib: Library, G: int, settings: SpeedSettings, base: str, say: Say) -> None:
    """Give the library a consolidated model if it has none (Step 2 has usually saved one already)."""
    from fl2t.consolidate import consolidate

    if not (lib.path / "consolidated").is_dir():
        say(f"  G={G}: consolidating (the token lookup: generation speed does not depend on training)")
        model = consolidate(lib, ConsolidateSettings(seed=settings.seed), base=base)
        lib.save_consolidated(model.save_pretrained)


def _fl2t_variants(fl2t: Any, prompt: str, settings: SpeedSettings) -> tuple[Callable[..., Any], Callable[[], None]]:
    """(per-step hooks, per-prompt overhead): two variants on the FL2T pipeline's own modules."""
    from fl2t.pipeline import ExpertPipeline

    agg = fl2t.aggregated
    call = _call_kwargs(settings)

    def per_step_hooks(**kw: Any) -> Any:
        """All G experts, mixed by the same alpha and gamma, evaluated by hooks at every denoising step."""
        alpha, gamma = fl2t.weights_for(prompt)
        agg.set(alpha[None], None if gamma is None else gamma[None], shared=True)
        try:
            return ExpertPipeline.__call__(
                fl2t, prompt, generator=torch.Generator().manual_seed(settings.seed), **call, **kw
            )
        finally:
            agg.off()

    def prompt_overhead() -> None:
        """What FL2TPipeline adds per prompt, outside the sampling loop: alpha, gamma; fuse; unfuse."""
        alpha, gamma = fl2t.weights_for(prompt)
        agg.fuse(alpha, gamma, shared=True)
        agg.unfuse()

    return per_step_hooks, prompt_overhead


def _armed_steps(agg: Any, run: Callable[..., Any]) -> int:
    """Denoising steps at which the experts' hooks were armed, i.e. cost a term per expert at that step."""
    armed: list[bool] = []
    run(callback_on_step_end=lambda p, i, t, kw: (armed.append(agg.mix is not None), kw)[1])
    return sum(armed)


def _diffusers_pipeline(
    experts: list[Expert], settings: SpeedSettings, base: str, device: str, say: Say
) -> tuple[Any, float | None, str]:
    """diffusers' pipeline with one peft adapter per expert, mixed by `set_adapters` with equal weights:
    (pipeline or None, seconds to load it, a note if it was not run or failed)."""
    from fl2t.models import load_base
    from fl2t.pipeline import ExpertPipeline, diffusers_lora

    G = len(experts)
    if G > settings.diffusers_max:
        return None, None, f"not run: G > --diffusers-max {settings.diffusers_max}"
    say(f"  G={G}: loading {G} adapters into diffusers")
    try:
        start = time.perf_counter()
        dpipe = ExpertPipeline(**load_base(base).components, requires_safety_checker=False)
        dpipe.set_progress_bar_config(disable=True)
        for e in experts:
            dpipe.add_expert_tokens(e)
            dpipe.load_lora_weights(diffusers_lora(e), adapter_name=e.name)
        dpipe.set_adapters([e.name for e in experts], adapter_weights=[1.0 / G] * G)
        dpipe.to(device)
        return dpipe, time.perf_counter() - start, ""
    except Exception as e:  # a limit of diffusers/peft is a result to report, not a crash of the bench
        return None, None, failure_note(e)
