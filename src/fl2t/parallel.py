"""Step 1 over several processes (`torchrun`, `accelerate launch`): concept-parallel or data-parallel.

Concept-parallel (the default): concept i is learned by process i % N, alone, exactly as one process would
learn it; Step 1 never reads another concept's data, so the processes need no communication while training.
Data-parallel: every process trains the same concept together (DDP), each drawing its own samples.
Either way the library has one writer, the main process, which adds the experts in the given order.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from fl2t.data import Concept
from fl2t.expert import Expert
from fl2t.library import Library


def process_state() -> PartialState:
    """This process's place among the launched ones (a single process when not launched); set up once.

    `cpu` matches the Accelerator that `learn_expert` builds: without CUDA, processes talk over gloo.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def accelerator_device() -> torch.device:
    """The device this process computes on: its GPU under torchrun / accelerate launch, the GPU, or the CPU."""
    return process_state().device


def my_concepts(concepts: Sequence[Concept], rank: int, world: int) -> list[Concept]:
    """Concept-parallel share of process `rank` of `world`: every world-th concept, starting at `rank`."""
    return list(concepts[rank::world])


def learn_concepts(
    concepts: Sequence[Concept],
    library: Library,
    learn: Callable[[Concept], Expert],
    add: Callable[[Expert], None],
    *,
    data_parallel: bool = False,
    say: Callable[[str], None] = lambda msg: None,
) -> None:
    """Learn `concepts` with `learn` on the launched processes; the main process `add`s each expert, in order.

    `learn(concept)` must pass `data_parallel` on to `learn_expert`. With one process, or data-parallel, each
    expert is added as soon as it is learned (an interrupted run keeps the finished ones). Concept-parallel,
    each process saves its experts into a staging folder inside the library (so every process of a multi-node
    run can reach it), all wait, and the main process loads and adds them. Every process returns only when all
    are done.
    """
    state = process_state()
    if state.num_processes == 1 or data_parallel:
        for concept in concepts:
            expert = learn(concept)
            if state.is_main_process:
                add(expert)
        state.wait_for_everyone()
        return

    # One name for all processes; not `.tmp-*`, which any writer of the library sweeps away as debris.
    name = [f".staging-{uuid.uuid4().hex}" if state.is_main_process else None]
    broadcast_object_list(name)
    staging: Path = library.path / name[0]
    try:
        for concept in my_concepts(concepts, state.process_index, state.num_processes):
            expert = learn(concept)
            folder = staging / concept.name
            folder.mkdir(parents=True)
            expert.save(folder)
        if state.is_main_process and state.num_processes > 1:
            say(f"waiting for the other {state.num_processes - 1} process(es)")
        state.wait_for_everyone()
        if state.is_main_process:
            # Load all first: a staged file that changed on its way fails here, before the library is touched.
            experts = [Expert.load(staging / c.name) for c in concepts]
            for expert in experts:
                add(expert)
    finally:
        if state.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()
