"""`ewc`: the sequential LoRA with elastic weight consolidation (Kirkpatrick et al., PNAS 2017) on its parameters.

What it does. Task t's LoRA starts from task t−1's (as `sequential`) and its loss is the diffusion loss plus
`λ Σ_i F_i (θ_i − θ*_i)²` over the LoRA's entries, θ* being the LoRA after task t−1. At the END of each task, at
its final weights, the diagonal Fisher information of that task is estimated from the DATA LOSS ONLY: the mean
over `fisher_samples` single-sample batches of the task's own training data (fresh noise and timesteps, from a
generator seeded with the Step-1 seed) of the squared gradient of the diffusion loss. The penalty never enters
it. F is the sum of the earlier tasks' Fishers (one file per task in `workdir/fisher`) and θ* the latest LoRA:
online EWC (Schwarz et al. 2018 with γ = 1, the recursion Huszár 2018 shows to be the correct Laplace one),
rather than Kirkpatrick's one penalty per task with its own anchor, which counts earlier tasks again.

Where it departs, and why. A diffusion model has no tractable log-likelihood, so its training loss stands in:
the empirical Fisher of the denoising MSE (with its class images under prior preservation), a Monte-Carlo
estimate over images, noise and timesteps. Only the LoRA is consolidated: the base is frozen, and
each task has its own new token, which no later task trains. The concept tokens of earlier tasks stay as learned.

Cost: `fisher_samples` extra forward/backward passes of the UNet (one sample each) per task, after its training.

λ (`ewc_lambda`, default 5e4), chosen on task 2 of the tiny world at tiny10's Step-1 budget (two-task runs,
stripestar then checkdiamond, 400 steps each, both terms logged per step). The raw Fisher of a LoRA entry is
small and concentrated (task 1: mean 3.6e-7, median 7e-9, max 9e-5), so λ is large. Without the penalty (λ = 1)
task 2 drifts by Σ F (θ − θ*)² = 4.4e-6 while its diffusion loss is 0.32: λ ≈ 0.32 / 4.4e-6 ≈ 7e4 is where the
penalty of that drift equals the loss; 5e4 rounds it down. Under Adam the penalty held is smaller than that: at
λ = 5e4 it ends at 0.008 (2% of the loss; the drift cut 28 times), the LoRA's largest entry change over task 2 is
0.088 (0.077 without the penalty): not frozen. At λ = 1e6 and 1e7 the penalty held falls (0.001, 8e-5) as Adam
pins the high-Fisher entries, and the largest change falls to 0.056 and 0.015. A tuning sweep chooses λ properly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from pydantic import Field
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from fl2t.expert import Expert
from fl2t.experts import ExpertModel, Regulariser
from fl2t.files import atomic_write_bytes
from fl2t.methods.base import MethodSettings, Tokenize, lora_layers
from fl2t.methods.sequential import Sequential


class EWCSettings(MethodSettings):
    ewc_lambda: float = Field(5e4, ge=0, description="λ, the weight of the EWC penalty")
    fisher_samples: int = Field(32, ge=1, description="single-sample batches the Fisher is estimated from per task")


def lora_parameters(model: ExpertModel) -> dict[str, torch.nn.Parameter]:
    """The LoRA's parameters under the keys of an expert's `lora` ("<module>.lora_A.weight")."""
    out = {}
    for m, (a, b) in lora_layers(model.unet).items():
        out[f"{m}.lora_A.weight"], out[f"{m}.lora_B.weight"] = a, b
    return out


def diagonal_fisher(
    params: dict[str, torch.nn.Parameter], data_loss: Callable[[torch.Generator], torch.Tensor], samples: int, seed: int
) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher: the mean over `samples` draws of the squared gradient of `data_loss(gen)`
    with respect to each parameter (on the CPU, float32). The parameters' `.grad` are left untouched."""
    gen = torch.Generator().manual_seed(seed)
    names = list(params)
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for _ in range(samples):
        grads = torch.autograd.grad(data_loss(gen), [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                fisher[n] += g.detach().float() ** 2
    return {n: (f / samples).cpu() for n, f in fisher.items()}


class _EWC(Regulariser):
    def __init__(
        self, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float, samples: int, seed: int
    ) -> None:
        self.fisher, self.anchor, self.lam = fisher, anchor, lam  # F summed over earlier tasks; θ* = last LoRA
        self.samples, self.seed = samples, seed
        self.task_fisher: dict[str, torch.Tensor] = {}  # this task's, set by `end`

    def start(self, model: ExpertModel, tokenize: Tokenize) -> None:
        params = lora_parameters(model)
        # (parameter, F, θ*) on the LoRA's device, once, not at every step
        self.terms = [(params[n], f.to(params[n]), self.anchor[n].to(params[n])) for n, f in self.fisher.items()]

    def loss(self, model: ExpertModel, tokenize: Tokenize, gen: torch.Generator) -> torch.Tensor:
        if not self.terms:
            return torch.zeros(())
        return self.lam * torch.stack([(f * (p - a) ** 2).sum() for p, f, a in self.terms]).sum()

    def end(self, model: ExpertModel, data_loss: Callable[[int, torch.Generator], torch.Tensor]) -> None:
        params = lora_parameters(model)
        self.task_fisher = diagonal_fisher(params, lambda gen: data_loss(1, gen), self.samples, self.seed)


class EWC(Sequential):
    name = "ewc"
    settings_model = EWCSettings
    settings: EWCSettings

    def _fisher_file(self, task: str) -> Path:
        return self.ctx.workdir / "fisher" / f"{task}.safetensors"

    def regulariser(self, previous: list[Expert], scheduler: DDPMScheduler) -> _EWC:
        fisher: dict[str, torch.Tensor] = {}
        for e in previous:  # F: the sum of the earlier tasks' Fishers
            for n, f in load_file(self._fisher_file(e.name)).items():
                fisher[n] = fisher[n] + f if n in fisher else f
        anchor = previous[-1].lora if previous else {}
        s = self.settings
        self._reg = _EWC(fisher, anchor, s.ewc_lambda, s.fisher_samples, self.ctx.learn.seed + 11)
        return self._reg

    def after_task(self, expert: Expert) -> None:
        path = self._fisher_file(expert.name)
        path.parent.mkdir(exist_ok=True)
        atomic_write_bytes(path, st_save({n: f.contiguous() for n, f in self._reg.task_fisher.items()}))
