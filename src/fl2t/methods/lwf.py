"""`lwf`: the sequential LoRA with learning without forgetting (Li & Hoiem, 2017) for diffusion: while a task is
learned, the model's noise predictions on earlier concepts' prompts are distilled from the model as it was
before the task. No images of earlier concepts are read: the noisy inputs come from latents the model
generated for those prompts right after their own task (the experts' anchors). `LwFSettings.lwf_lambda` weights
the distillation term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from pydantic import Field

from fl2t.expert import Expert
from fl2t.experts import ExpertModel, Regulariser
from fl2t.methods.base import MethodSettings, Tokenize
from fl2t.methods.sequential import Sequential


class LwFSettings(MethodSettings):
    lwf_lambda: float = Field(1.0, ge=0, description="weight of the distillation term")


class _LwF(Regulariser):
    def __init__(self, previous: list[Expert], scheduler: DDPMScheduler, lam: float, batch: int, seed: int) -> None:
        self.previous, self.scheduler, self.lam, self.batch, self.seed = previous, scheduler, lam, batch, seed

    @torch.no_grad()
    def start(self, model: ExpertModel, tokenize: Tokenize) -> None:
        latents = torch.cat([e.anchors for e in self.previous])  # (K, C, h, w): the earlier tasks' generations
        prompts = [p for e in self.previous for p in e.anchor_prompts]
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        device = next(model.parameters()).device  # the distillation set lives there, moved once
        self.noisy = self.scheduler.add_noise(latents, noise, t).to(device)
        self.t, self.ids = t.to(device), tokenize(prompts).to(device)
        was_training = model.training
        model.eval()
        # The teacher: the model before this task (the LoRA holds the previous task's weights at start).
        self.targets = torch.cat(
            [
                model(self.noisy[i : i + 16], self.t[i : i + 16], self.ids[i : i + 16]).float()
                for i in range(0, len(latents), 16)
            ]
        )
        model.train(was_training)

    def loss(self, model: ExpertModel, tokenize: Tokenize, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self.noisy), (self.batch,), generator=gen).to(self.noisy.device)
        pred = model(self.noisy[idx], self.t[idx], self.ids[idx]).float()
        return self.lam * F.mse_loss(pred, self.targets[idx])


class LwF(Sequential):
    name = "lwf"
    needs_anchors = True
    settings_model = LwFSettings
    settings: LwFSettings

    def regulariser(self, previous: list[Expert], scheduler: DDPMScheduler) -> _LwF | None:
        if not previous:
            return None
        s = self.ctx.learn
        return _LwF(previous, scheduler, self.settings.lwf_lambda, s.batch_size, s.seed + 7)
