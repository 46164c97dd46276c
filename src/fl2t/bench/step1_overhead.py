"""Step 1's own overhead: a training step of `learn_expert` against a plain diffusers + peft LoRA loop written here,
with the same UNet, rank, targets, batch, precision and trained parameters (the LoRA and the concept's token
embedding), interleaved in one run so that both see the same machine load.

The plain loop is a lean version of what a diffusers user writes (the DreamBooth-LoRA and textual-inversion
examples): peft's `add_adapter` on the UNet; the new token's embedding row a parameter of its own, put into the input
embeddings' output by a forward hook (leaner than the examples' whole trainable embedding matrix, with its rows put
back after every step: that made the plain loop 1.6x slower than fl2t's on the tiny world); the reference images'
latent distributions encoded once; noise and timesteps drawn on the device; one `loss.item()` per step for the log. `learn_expert` runs its real loop; after each of its steps (its
`on_step`) the plain loop takes one step. A step's time is from the end of the other loop's step to the end of its
own; the first `WARMUP` steps of each are left out.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig

from fl2t.config import LearnSettings
from fl2t.data import Concept
from fl2t.experts import learn_expert, lora_target_regex
from fl2t.models import load_base, resolution_of
from fl2t.parallel import accelerator_device

WARMUP = 2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class PlainLoop:
    """One LoRA + token-embedding training step at a time, written the way diffusers' examples write it."""

    def __init__(self, pipe: StableDiffusionPipeline, concept: Concept, settings: LearnSettings, seed: int) -> None:
        self.device = accelerator_device()
        self.settings, self.dtype = settings, DTYPES.get(settings.mixed_precision, torch.float32)
        spec = concept.spec
        tok, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
        for m in (unet, pipe.vae, text_encoder):
            m.requires_grad_(False)
        tok.add_tokens(spec.tokens)
        ids = tok.convert_tokens_to_ids(spec.tokens)
        text_encoder.resize_token_embeddings(len(tok))
        embedding = text_encoder.get_input_embeddings()
        class_ids = tok(spec.class_word, add_special_tokens=False).input_ids
        init = embedding.weight[class_ids].detach().float().mean(0)
        text_encoder.to(self.device, self.dtype)
        self.ids = torch.tensor(ids, device=self.device)
        self.rows = torch.nn.Parameter(init.expand(len(ids), -1).clone().to(self.device))
        embedding.register_forward_hook(self._new_rows)
        unet.to(self.device, self.dtype)
        r = settings.rank
        unet.add_adapter(
            LoraConfig(r=r, lora_alpha=r, init_lora_weights=True, target_modules=lora_target_regex(settings))
        )
        lora = [p for p in unet.parameters() if p.requires_grad]
        for p in lora:
            p.data = p.data.float()
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(
            [
                {"params": lora, "lr": settings.lr, "weight_decay": settings.weight_decay},
                {"params": [self.rows], "lr": settings.embedding_lr, "weight_decay": 0.0},
            ]
        )
        self.lr = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: max(0.0, 1 - s / settings.steps))
        self.mean, self.std, self.scaling = _latent_distributions(pipe, concept, settings, self.device)
        self.prompt = spec.stable_prompt
        self.pipe = pipe
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.gen = torch.Generator(self.device).manual_seed(seed)
        unet.train()

    def step(self) -> float:
        pipe, b, dev = self.pipe, self.settings.batch_size, self.device
        idx = torch.randint(len(self.mean), (b,), generator=self.gen, device=dev)
        mean, std = self.mean[idx], self.std[idx]
        latents = (mean + std * torch.randn(mean.shape, generator=self.gen, device=dev)) * self.scaling
        noise = torch.randn(latents.shape, generator=self.gen, device=dev)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=self.gen, device=dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        ids = pipe.tokenizer([self.prompt] * b, padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.autocast(dev.type, self.dtype, enabled=self.dtype != torch.float32):
            states = pipe.text_encoder(ids.to(dev))[0]
            pred = pipe.unet(noisy.to(self.dtype), t, states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.lr.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def _new_rows(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """The input embeddings with the new tokens' trained rows in their places."""
        new = (args[0][..., None] == self.ids).to(out.dtype)  # (B, T, n)
        return out * (1 - new.sum(-1, keepdim=True)) + new @ self.rows.to(out.dtype)


def _latent_distributions(
    pipe: StableDiffusionPipeline, concept: Concept, settings: LearnSettings, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    size = settings.resolution or resolution_of(pipe)
    pixels = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1 for im in concept.images]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(device, pipe.vae.dtype)
    pipe.vae.to(device)
    with torch.no_grad():
        dist = pipe.vae.encode(x).latent_dist
    return dist.mean.float(), dist.std.float(), pipe.vae.config.scaling_factor


def _sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_step1_overhead(base: str, concept: Concept, settings: LearnSettings) -> dict[str, Any]:
    """Median step time of `learn_expert` and of the plain loop, interleaved, and their ratio."""
    settings = settings.model_copy(update={"num_anchors": 0, "checkpoint_every": 0, "prior_preservation": False})
    plain = PlainLoop(load_base(base), concept, settings, settings.seed)
    fl2t_times: list[float] = []
    plain_times: list[float] = []
    mark = [0.0]

    def on_step(i: int, loss: float) -> None:
        end = _sync()
        if i > 0:
            fl2t_times.append(end - mark[0])
        plain.step()
        mark[0] = _sync()
        plain_times.append(mark[0] - end)

    mark[0] = _sync()
    learn_expert(concept, load_base(base), settings, on_step=on_step)
    fl2t_s, plain_s = median(fl2t_times[WARMUP:]), median(plain_times[WARMUP:])
    return {
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "mixed_precision": settings.mixed_precision,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "resolution": settings.resolution,
        "fl2t_step_s": {"median": fl2t_s, "times": fl2t_times},
        "plain_step_s": {"median": plain_s, "times": plain_times},
        "ratio": fl2t_s / plain_s,
    }
