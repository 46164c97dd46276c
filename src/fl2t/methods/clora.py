"""`c-lora` (Smith et al., "Continual Diffusion", 2023): a new LoRA per task, the model being the sum of all
tasks' LoRAs; while task t is learned, its update is penalised where the earlier tasks' summed update is
large: `λ Σ_l ‖ΔW_l^{<t} ⊙ B_l^t A_l^t‖²` (self-regularisation). Each concept has its own token.
`CLoRASettings.clora_lambda` sets λ.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from pydantic import Field

from fl2t.expert import Expert
from fl2t.experts import ExpertModel, Regulariser
from fl2t.methods.base import MethodSettings, Tokenize, dense_update, lora_layers
from fl2t.methods.sequential import Sequential
from fl2t.pipeline import diffusers_lora
from fl2t.sampling import Sampler


class CLoRASettings(MethodSettings):
    clora_lambda: float = Field(1e6, ge=0, description="λ, the weight of the self-regularisation penalty")


class _CLoRA(Regulariser):
    def __init__(self, previous: list[Expert], lam: float) -> None:
        self.lam = lam
        modules = sorted({m for e in previous for m in e.modules})
        self.past: dict[str, torch.Tensor] = {}  # module -> summed earlier ΔW (out, in)
        for m in modules:
            updates = [d for e in previous if (d := dense_update(e, m)) is not None]
            self.past[m] = torch.stack(updates).sum(0)

    def start(self, model: ExpertModel, tokenize: Tokenize) -> None:
        self.layers = lora_layers(model.unet)
        # on the LoRA's device and dtype once, not at every step
        self.past = {m: w.to(self.layers[m][0]) for m, w in self.past.items() if m in self.layers}

    def loss(self, model: ExpertModel, tokenize: Tokenize, gen: torch.Generator) -> torch.Tensor:
        terms = [((self.past[m] * (b @ a)) ** 2).sum() for m, (a, b) in self.layers.items() if m in self.past]
        return self.lam * torch.stack(terms).sum() if terms else torch.zeros(())


class CLoRA(Sequential):
    name = "c-lora"
    continues = False
    settings_model = CLoRASettings
    settings: CLoRASettings

    def regulariser(self, previous: list[Expert], scheduler: DDPMScheduler) -> _CLoRA | None:
        return _CLoRA(previous, self.settings.clora_lambda) if previous else None

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        for e in experts:
            pipe.load_lora_weights(diffusers_lora(e), adapter_name=e.name)
        if experts:
            pipe.set_adapters([e.name for e in experts], adapter_weights=[1.0] * len(experts))
        return Sampler(pipe)
