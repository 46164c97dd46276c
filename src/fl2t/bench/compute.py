"""Compute counted per method in `fl2t bench continual`, so that a lead cannot be bought by compute: for every task,
what the method's Step 1 (`learn`) and Step 2 (`consolidate`, or whatever the method does there) cost, counted from
outside the methods, none of which is changed for it.

A `Counter` is a context manager that counts, while it is open:
- optimizer steps: torch's global optimizer step hook (every `torch.optim.Optimizer.step`, accelerate's wrapper
  included, counted once);
- UNet forward passes: a global module forward hook filtered to diffusers' `UNet2DConditionModel`, in calls and in
  sample-forwards (a call on a batch of n rows counts n; a classifier-free-guided step of n images counts 2n),
  split by whether the output carries a graph ("with grad": a backward can follow; a forward under grad mode
  through frozen weights only, like a teacher's, counts as without). The issue asked for a forward *pre* hook;
  the global one is not shown keyword arguments, and diffusers' pipelines call the UNet with the sample as a
  keyword, so the batch size is read from the output instead;
- wall seconds (CUDA work waited for at both ends);
- peak memory above what was in use when the counter opened (`measure.PeakMemory`): on CUDA the peak allocation
  (`torch.cuda.max_memory_allocated`, reset when the counter opens) minus the allocation at the start; on the CPU
  the peak resident memory of the process, sampled by a thread every 2 ms, minus the resident memory at the start.
  Models loaded before the phase (the base pipeline cached per process) are not in it.

The hooks are global (the whole process), removed when the counter closes; while they are registered every module
call takes torch's slower hooked path, the same for every method. Evaluation sampling is not counted: it is the
same for everyone.

The experts learned alone (the shared store, `MethodContext.store`) are learned once, where it happens: by the
benchmark's expert units (`store_learned`) or inside a method's `learn` when one is missing (`counted_task`
notices the store gained the concept). Either way the work is written once as the concept's store record, and
`method_compute` adds it to the Step 1 of every method that uses the store (the `AloneMethod`s: oracle, lookup,
merge, magmax-alone, fl2t), since each of them needs that work to exist; it is not divided between them. The synthetic
anchors Step 2 trains on are generated at the end of Step 1 (`learn_expert`), so they are Step 1's no-grad
forwards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import UNet2DConditionModel
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

from fl2t.bench.measure import MB, PeakMemory
from fl2t.files import atomic_write_text
from fl2t.library import Library
from fl2t.methods.base import AloneMethod

if TYPE_CHECKING:
    from fl2t.data import Concept
    from fl2t.methods import Method

COUNTS = ("steps", "unet_calls_grad", "unet_calls_nograd", "unet_forwards_grad", "unet_forwards_nograd", "seconds")
STORE_RECORDS = "store_compute"  # run folder / this / <concept>.json: the work of learning the store's expert


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Counter:
    """Counts optimizer steps, UNet forwards, seconds and peak memory while open (see the module's docstring);
    `counts` holds them (COUNTS and `peak_mb`, None where memory cannot be measured) once it is closed."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {k: 0 for k in COUNTS} | {"seconds": 0.0, "peak_mb": None}

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.counts["steps"] += 1

    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not isinstance(module, UNet2DConditionModel):
            return
        sample = output if torch.is_tensor(output) else output[0]  # UNet2DConditionOutput or return_dict=False
        kind = "grad" if sample.requires_grad else "nograd"
        self.counts[f"unet_calls_{kind}"] += 1
        self.counts[f"unet_forwards_{kind}"] += sample.shape[0]

    def __enter__(self) -> Counter:
        self._memory = PeakMemory().__enter__()
        self._hooks = [register_optimizer_step_post_hook(self._on_step), register_module_forward_hook(self._on_forward)]
        _sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            _sync()
            self.counts["seconds"] = round(time.perf_counter() - self._start, 3)
        finally:
            for hook in self._hooks:
                hook.remove()
            self._memory.__exit__(*exc)
        peak = (self._memory.cuda if torch.cuda.is_available() else self._memory.rss)[0]
        self.counts["peak_mb"] = None if peak is None else round(max(peak, 0) / MB, 1)


def _in_store(store: Path, name: str) -> bool:
    lib = Library(store)
    return lib.exists and name in lib.names()


def store_record(run: Path, name: str) -> dict[str, Any] | None:
    """The counted work of learning concept `name`'s expert alone, or None (not learned under a counter)."""
    path = run / STORE_RECORDS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _write_store_record(run: Path, name: str, counts: dict[str, Any]) -> None:
    path = run / STORE_RECORDS / f"{name}.json"
    if not path.is_file():  # learned once: a record already there is that learning's
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(counts, indent=2))


def store_learned(method: Method, concept: Concept, run: Path) -> None:
    """Learn the concept's expert into the shared store under a counter, and write its store record (nothing is
    written when the store had it already)."""
    had = _in_store(method.ctx.store, concept.name)
    with Counter() as c:
        method.store_expert(concept)
    if not had:
        _write_store_record(run, concept.name, c.counts)


def counted_task(method: Method, concept: Concept, run: Path) -> dict[str, Any]:
    """One task of a method: `learn` (unless it finished before an interruption) and `consolidate`, each under a
    counter. Returns the task's `_compute` entry: the concept, `step1` (None when learn was not run here: its work
    was not seen), `step2`, `uses_store` and `store_learned` (this learn learned the store's expert, whose record
    it then writes under the run folder `run`)."""
    had = _in_store(method.ctx.store, concept.name)
    step1 = None
    if concept.name not in method.tasks:
        with Counter() as c1:
            method.learn(concept)
        step1 = c1.counts
    learned = not had and _in_store(method.ctx.store, concept.name)
    if learned and step1 is not None:
        _write_store_record(run, concept.name, step1)
    with Counter() as c2:
        method.consolidate()
    return {
        "concept": concept.name,
        "step1": step1,
        "step2": c2.counts,
        "uses_store": isinstance(method, AloneMethod),
        "store_learned": learned,
    }


def _total(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and seconds summed, peak memory the largest."""
    out: dict[str, Any] = {k: sum(p[k] for p in phases) for k in COUNTS}
    peaks = [p["peak_mb"] for p in phases if p.get("peak_mb") is not None]
    out["peak_mb"] = max(peaks) if peaks else None
    return out


def _mean_over_orders(totals: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and seconds averaged over orders; peak memory the largest over orders."""
    out: dict[str, Any] = {k: round(sum(t[k] for t in totals) / len(totals), 3) for k in COUNTS}
    peaks = [t["peak_mb"] for t in totals if t["peak_mb"] is not None]
    out["peak_mb"] = max(peaks) if peaks else None
    return out


def method_compute(runs: list[list[dict[str, Any]]], run: Path) -> dict[str, Any] | None:
    """A method's compute from its task files (each order's, in task order; their `_compute` entries): per phase
    (`step1`, `step2`, `total`) the totals over tasks, averaged over orders. A method that uses the store has the
    store records of its concepts in its Step 1 (and not again the learn that wrote one). None when some task was
    not counted (results of an older run; a learn resumed past, for a method whose Step 1 is its own) or a store
    record is missing."""
    per_order = []
    for tasks in runs:
        entries = [task.get("_compute") for task in tasks]
        if not entries or any(e is None for e in entries):
            return None
        uses_store = entries[0]["uses_store"]
        if not uses_store and any(e["step1"] is None for e in entries):
            return None
        # A store user's own learn is the store's lookup: with the store records, one it did not see changes nothing.
        step1 = [e["step1"] for e in entries if e["step1"] is not None and not (uses_store and e["store_learned"])]
        if uses_store:
            records = [store_record(run, e["concept"]) for e in entries]
            if any(r is None for r in records):
                return None
            step1 += records
        step2 = [e["step2"] for e in entries]
        per_order.append({"step1": _total(step1), "step2": _total(step2), "total": _total(step1 + step2)})
    if not per_order:
        return None
    out = {phase: _mean_over_orders([o[phase] for o in per_order]) for phase in ("step1", "step2", "total")}
    return {**out, "uses_store": uses_store}
