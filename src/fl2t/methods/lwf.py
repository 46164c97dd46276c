"""`lwf`: the sequential LoRA with Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), for diffusion.

What it does. Task t's LoRA starts from task t−1's (as `sequential`). At every step, besides the diffusion loss on
task t's images, a batch of `batch_size` earlier-task inputs is drawn afresh: anchors of earlier tasks (latents
the model generated for those tasks' prompts right after each task: `Expert.anchors` / `anchor_prompts`), noised
with FRESH noise at FRESH timesteps; the current model's noise prediction on them is pulled (MSE, weight
`lwf_lambda`) towards that of the FROZEN PREVIOUS MODEL, the LoRA as it was at the start of task t, computed on the
fly under no_grad by swapping the previous LoRA's weights into the UNet for one forward and back.

This is LwF's recipe: the old model's outputs on the new step's inputs are the targets (recorded "responses"),
no old data is stored. Where it departs, and why: LwF feeds the NEW task's images to the old model; for a
text-to-image model the old concepts' behaviour is only seen on their own prompts, so the inputs are the old
prompts with the model's own generations as the clean latents (data-free, no images of earlier concepts are
read). The distillation loss is the MSE of the noise predictions (the diffusion analogue of LwF's
temperature-scaled cross-entropy on logits). The earlier concepts' tokens are frozen, as in `sequential`.

Cost per step: one extra no-grad UNet forward (the teacher) and one extra forward/backward (the student), each on
`batch_size` anchors; and the anchors themselves (`num_anchors` sampled generations per task, after each task).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from pydantic import Field

from fl2t.expert import Expert
from fl2t.experts import ExpertModel, Regulariser
from fl2t.methods.base import MethodSettings, Tokenize, lora_layers
from fl2t.methods.sequential import Sequential


class LwFSettings(MethodSettings):
    lwf_lambda: float = Field(1.0, ge=0, description="weight of the distillation term")


class _LwF(Regulariser):
    def __init__(self, previous: list[Expert], scheduler: DDPMScheduler, lam: float, batch: int) -> None:
        self.scheduler, self.lam, self.batch = scheduler, lam, batch
        self.latents = torch.cat([e.anchors for e in previous])  # (K, C, h, w): the earlier tasks' generations
        self.prompts = [p for e in previous for p in e.anchor_prompts]
        self.teacher_lora = previous[-1].lora  # the previous model: the LoRA at the start of this task

    @torch.no_grad()
    def start(self, model: ExpertModel, tokenize: Tokenize) -> None:
        layers = lora_layers(model.unet)
        self.params = [p for a, b in layers.values() for p in (a, b)]
        keys = [f"{m}.lora_{x}.weight" for m in layers for x in "AB"]
        # the teacher's weights, on the LoRA's device once; swapped with the live ones for each teacher forward
        self.teacher = [self.teacher_lora[k].to(p) for k, p in zip(keys, self.params, strict=True)]
        device = self.params[0].device
        self.latents, self.ids = self.latents.to(device), tokenize(self.prompts).to(device)

    def draw(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fresh distillation batch: noisy anchors, their timesteps, their prompts' ids."""
        idx = torch.randint(len(self.latents), (self.batch,), generator=gen)
        clean = self.latents[idx.to(self.latents.device)]
        noise = torch.randn(clean.shape, generator=gen).to(clean)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch,), generator=gen).to(clean.device)
        return self.scheduler.add_noise(clean, noise, t), t, self.ids[idx.to(self.ids.device)]

    @torch.no_grad()
    def teacher_prediction(
        self, model: ExpertModel, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """The previous model's prediction: its LoRA swapped in for one forward, then the current one back."""
        self._swap()
        try:
            return _forward(model, noisy, t, ids)
        finally:
            self._swap()

    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            p.data, self.teacher[i] = self.teacher[i], p.data

    def loss(self, model: ExpertModel, tokenize: Tokenize, gen: torch.Generator) -> torch.Tensor:
        noisy, t, ids = self.draw(gen)
        target = self.teacher_prediction(model, noisy, t, ids)
        return self.lam * F.mse_loss(_forward(model, noisy, t, ids), target)


def _forward(model: ExpertModel, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The model's prediction in fp32, under autocast to the frozen UNet's precision where Step 1 runs at reduced
    precision (as its data loss runs): the anchors are fp32, the frozen weights then bf16 or fp16."""
    dtype = next(model.unet.parameters()).dtype  # the frozen weights' (a UNet's first: conv_in; the LoRA's are fp32)
    with torch.autocast(noisy.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model(noisy, t, ids).float()


class LwF(Sequential):
    name = "lwf"
    needs_anchors = True
    settings_model = LwFSettings
    settings: LwFSettings

    def regulariser(self, previous: list[Expert], scheduler: DDPMScheduler) -> _LwF | None:
        if not previous:
            return None
        return _LwF(previous, scheduler, self.settings.lwf_lambda, self.ctx.learn.batch_size)
