"""The interface every continual method implements, and what they share.

A method learns concepts one task at a time (`learn`), optionally consolidates (`consolidate`), and gives a
`Sampler` for generation. Its whole state lives on disk under `ctx.workdir` (a Library of what it learned,
plus method-specific safetensors), so the benchmark can stop and resume between tasks. Experts learned alone
(the same for any order) are shared between methods through `ctx.store`. A method's own settings are a
pydantic model defined next to it (`EWCSettings` in ewc.py), filled in from the benchmark's config.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict

from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.data import Concept
from fl2t.errors import Fl2tError
from fl2t.expert import Expert
from fl2t.experts import learn_expert
from fl2t.files import atomic_write_text
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.library import Library
from fl2t.models import load_base
from fl2t.parallel import accelerator_device
from fl2t.pipeline import ExpertPipeline
from fl2t.sampling import Sampler

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


class MethodSettings(BaseModel):
    """A method's own settings: none for most methods; a method with some subclasses this model in its file.
    Unknown keys are refused, so a misspelt setting in a benchmark config is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class MethodContext:
    base: str  # base model: hub id or local diffusers folder
    learn: LearnSettings  # the Step-1 budget, the same for every method
    workdir: Path  # this method's state for one task order
    store: Path  # a Library of experts learned alone, shared by the methods that use them
    consolidate: ConsolidateSettings = field(default_factory=ConsolidateSettings)
    settings: MethodSettings | None = None  # the method's own settings (its `settings_model`); None: the defaults
    on_step: Callable[[int, float], None] | None = None  # Step-1/Step-2 progress
    device: str | None = None  # where the method samples; None: this process's accelerator (`accelerator_device`)


Tokenize = Callable[[list[str]], torch.Tensor]  # prompts -> token ids (B, 77), what a Regulariser is given


@functools.lru_cache(maxsize=1)
def _loaded_base(base: str) -> StableDiffusionPipeline:
    return load_base(base)


class Method:
    """One continual method. Subclasses set `name` and implement `learn` and `sampler`.

    What a subclass may declare besides:
    - `settings_model`: the pydantic model of its own settings (the empty `MethodSettings` by default). The
      instance's settings are `self.settings`: `ctx.settings`, or the model's defaults when that is None.
    - `samples_per_concept`: True for a method that samples each concept with a model of that concept alone,
      fixed once the concept is learned (the oracle). Its `sampler(concept)` must name the concept; a concept's
      images are the same after every later task, so the benchmark generates and scores them once; and two
      concepts cannot share a prompt, so it has no multi-concept score.
    """

    name = ""
    settings_model: type[MethodSettings] = MethodSettings
    samples_per_concept = False

    def __init__(self, ctx: MethodContext) -> None:
        settings = self.settings_model() if ctx.settings is None else ctx.settings
        if type(settings) is not self.settings_model:
            raise Fl2tError(f"method {self.name} takes {self.settings_model.__name__}, not {type(settings).__name__}")
        self.ctx, self.settings = ctx, settings
        ctx.workdir.mkdir(parents=True, exist_ok=True)

    # -- the tasks done so far, in arrival order ---------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        path = self.ctx.workdir / "tasks.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def _done(self, name: str) -> None:
        path = self.ctx.workdir / "tasks.json"
        atomic_write_text(path, json.dumps([*self.tasks, name]))

    @property
    def library(self) -> Library:
        return Library(self.ctx.workdir / "library")

    # -- the interface -----------------------------------------------------------------------------------
    def learn(self, concept: Concept) -> None:
        raise NotImplementedError

    def consolidate(self) -> None:
        """Methods with a step after learning (fl2t's Step 2) run it here; the others have none."""

    def sampler(self, concept: str | None = None) -> Sampler:
        """A sampler with every concept learned so far; `concept` names the concept the prompts are for
        (only a method with `samples_per_concept` uses it: the oracle samples with that concept's expert
        alone)."""
        raise NotImplementedError

    # -- shared helpers ----------------------------------------------------------------------------------
    def store_expert(self, concept: Concept) -> Expert:
        """The concept's expert learned alone, from the shared store; learned and added when missing."""
        store = Library(self.ctx.store, wait=True)  # workers of a spread benchmark add to it at once
        if store.exists and concept.name in store.names():
            return store.expert(concept.name)
        expert = learn_expert(concept, self.fresh_base(), self.ctx.learn, on_step=self.ctx.on_step)
        store.add(expert)
        return expert

    def experts(self) -> list[Expert]:
        """This method's experts in arrival order."""
        lib = self.library
        return [lib.expert(n) for n in self.tasks]

    @property
    def device(self) -> torch.device:
        return torch.device(self.ctx.device) if self.ctx.device else accelerator_device()

    def fresh_base(self) -> StableDiffusionPipeline:
        """A private copy of the base pipeline (loaded from disk once per process)."""
        return copy.deepcopy(_loaded_base(self.ctx.base))

    def base_pipeline(self, experts: Sequence[Expert] = ()) -> ExpertPipeline:
        """The base model with these experts' tokens (no LoRA yet), on the method's device."""
        pipe = ExpertPipeline(**self.fresh_base().components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for e in experts:
            pipe.add_expert_tokens(e)
        return pipe.to(self.device)


class AloneMethod(Method):
    """A method whose Step 1 learns each concept alone (oracle, lookup, merge, magmax-alone, fl2t): the expert comes from the
    shared store, so it is learned once for every such method and every order."""

    def learn(self, concept: Concept) -> None:
        expert = self.store_expert(concept)
        if concept.name not in self.library.names():
            self.library.add(expert)
        self._done(concept.name)


def mixed_sampler(pipe: ExpertPipeline, experts: list[Expert], weights: Callable[[str], torch.Tensor]) -> Sampler:
    """A sampler whose update for a prompt is `Σ_g w_{l,g} B_l^g A_l^g` (w = weights(prompt), (L, G)), applied
    per image by the aggregated-LoRA hooks, so one call can hold different prompts."""
    agg = AggregatedLoRA(pipe.unet, stack_experts(experts, pipe.unet))
    return Sampler(pipe, arm=lambda prompts: agg.set(torch.stack([weights(p) for p in prompts])), disarm=agg.off)


def lora_layers(unet: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """The trained LoRA's factors per adapted module: name -> (A (r, in), B (out, r)) parameters."""
    out: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return out


def dense_update(expert: Expert, module: str) -> torch.Tensor | None:
    """The expert's dense ΔW = B A (out, in) of one module (for the baselines that need it), or None."""
    a = expert.lora.get(f"{module}.lora_A.weight")
    return None if a is None else expert.lora[f"{module}.lora_B.weight"] @ a
