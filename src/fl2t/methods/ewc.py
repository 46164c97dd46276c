"""`ewc`: the sequential LoRA with elastic weight consolidation (Kirkpatrick et al., 2017) on its parameters.

The diagonal Fisher information of each task is the mean squared gradient of its training loss over its
steps, normalised to mean 1 and summed over tasks; the penalty is `λ Σ F (θ − θ*)²` with θ* the LoRA after
the previous task. `EWCSettings.ewc_lambda` sets λ.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from pydantic import Field
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from fl2t.expert import Expert
from fl2t.experts import ExpertModel, Regulariser
from fl2t.files import atomic_write_bytes
from fl2t.methods.base import MethodSettings, Tokenize
from fl2t.methods.sequential import Sequential


class EWCSettings(MethodSettings):
    ewc_lambda: float = Field(1e4, ge=0, description="λ, the weight of the EWC penalty")


class _EWC(Regulariser):
    def __init__(self, fisher: dict[str, torch.Tensor], lam: float) -> None:
        self.fisher, self.lam = fisher, lam
        self.grad_sq: dict[str, torch.Tensor] = {}
        self.steps = 0

    def _params(self, model: ExpertModel) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.unet.named_parameters() if p.requires_grad}

    def start(self, model: ExpertModel, tokenize: Tokenize) -> None:
        params = self._params(model)
        self.anchor = {n: p.detach().clone() for n, p in params.items()}  # θ*: the previous LoRA
        self.on_device = {n: f.to(params[n]) for n, f in self.fisher.items() if n in params}  # once, not every step

    def loss(self, model: ExpertModel, tokenize: Tokenize, gen: torch.Generator) -> torch.Tensor:
        if not self.fisher:
            return torch.zeros(())
        params = {n: p for n, p in self._params(model).items() if n in self.on_device}
        terms = [(self.on_device[n] * (p - self.anchor[n]) ** 2).sum() for n, p in params.items()]
        return self.lam * torch.stack(terms).sum()

    def after_backward(self, model: ExpertModel) -> None:
        self.steps += 1
        for n, p in self._params(model).items():
            if p.grad is not None:
                g = p.grad.detach().float() ** 2
                self.grad_sq[n] = self.grad_sq[n] + g if n in self.grad_sq else g

    def task_fisher(self) -> dict[str, torch.Tensor]:
        mean = torch.cat([g.flatten() for g in self.grad_sq.values()]).mean().clamp(min=1e-30)
        return {n: (g / mean).cpu() for n, g in self.grad_sq.items()}  # the mean over steps, scaled to mean 1


class EWC(Sequential):
    name = "ewc"
    settings_model = EWCSettings
    settings: EWCSettings

    @property
    def _fisher_file(self) -> Path:
        return self.ctx.workdir / "fisher.safetensors"

    def regulariser(self, previous: list[Expert], scheduler: DDPMScheduler) -> _EWC:
        fisher = load_file(self._fisher_file) if previous and self._fisher_file.is_file() else {}
        self._reg = _EWC(fisher, self.settings.ewc_lambda)
        return self._reg

    def after_task(self, expert: Expert) -> None:
        total = dict(self._reg.fisher)
        for n, f in self._reg.task_fisher().items():
            total[n] = total[n] + f if n in total else f
        atomic_write_bytes(self._fisher_file, st_save({n: t.contiguous() for n, t in total.items()}))
