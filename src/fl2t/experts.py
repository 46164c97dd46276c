"""Step 1: learn one concept expert alone (DESIGN §3) — its token embedding(s) and a rank-r LoRA on the UNet.

One training loop, read top to bottom, in the manner of diffusers' train_dreambooth_lora.py; the set-up before it
(frozen base, training data, tokens, LoRA, optimiser, resume) is in named helpers below it. It never reads another
concept's data or weights, so concepts can be learned at the same time on different processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from fl2t.config import LearnSettings
from fl2t.data import Concept, ConceptSpec, caption_templates
from fl2t.errors import Cancelled, Fl2tError
from fl2t.expert import Expert
from fl2t.files import atomic_write_bytes, kill_point
from fl2t.models import base_config_hash, load_base, resolution_of
from fl2t.pipeline import ExpertPipeline
from fl2t.text import (
    ConceptTokenEmbeddings,
    add_tokens,
    check_new_tokens,
    class_word_embedding,
    encode_layerwise,
    set_layerwise_processors,
)

Tokenize = Callable[[list[str]], torch.Tensor]


def lora_target_regex(settings: LearnSettings) -> str:
    """A peft `target_modules` regex (full match) for the chosen attention blocks and projections."""
    attn = {"all": "attn[12]", "cross": "attn2", "self": "attn1"}[settings.lora_attention]
    projections = "|".join(t.replace(".", r"\.") for t in settings.lora_targets)
    return rf".*\.{attn}\.({projections})"


def images_to_tensor(images: list[Image.Image], size: int, flip: bool) -> torch.Tensor:
    """Shorter side to `size`, centre crop, [-1, 1]: (N, 3, size, size); with `flip`, (2N, ...) with mirrors."""
    out = []
    for im in images:
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    x = torch.stack(out)
    return torch.cat([x, x.flip(-1)]) if flip else x


class ExpertModel(nn.Module):
    """What Step 1 trains: the UNet's LoRA and the concept's token embeddings; everything else is frozen."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokens: ConceptTokenEmbeddings) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokens = tokens.attach(text_encoder)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return encode_layerwise(self.text_encoder, input_ids, [self.tokens], self.tokens.n_layers)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, self.encode(input_ids)).sample


class Regulariser:
    """A term added to Step 1's loss by a continual baseline (EWC, LwF, C-LoRA, CIDM); no-ops by default.

    `start` sees the model before the first step (the LoRA already holds `init_lora`), `loss` returns the
    term for one step, `after_backward` sees the gradients, and `end` sees the model at its final weights
    with `data_loss(batch_size, gen)`: the diffusion loss alone (no regulariser term) of a fresh batch of the
    task's training data with fresh noise and timesteps drawn from `gen` (EWC takes its Fisher information
    there).
    """

    def start(self, model: ExpertModel, tokenize: Tokenize) -> None:
        pass

    def loss(self, model: ExpertModel, tokenize: Tokenize, gen: torch.Generator) -> torch.Tensor:
        return torch.zeros(())

    def after_backward(self, model: ExpertModel) -> None:
        pass

    def end(self, model: ExpertModel, data_loss: Callable[[int, torch.Generator], torch.Tensor]) -> None:
        pass


@dataclass
class TrainingData:
    """What every step samples from: the concept's images as latent distributions, their captions, class images."""

    lat_mean: torch.Tensor  # (N, C, h, w), N reference images (2N with mirrors), unscaled
    lat_std: torch.Tensor  # (N, C, h, w)
    scaling: float  # the VAE's latent scaling factor
    captions: list[str | None]  # per image; None: a caption template with the concept's subject
    templates: list[str]
    subject: str
    class_prompt: str
    class_latents: torch.Tensor | None  # (K, C, h, w) base-model class images (scaled), for prior preservation

    def sample(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Latents (B or 2B with class images, C, h, w) and their prompts."""
        idx = torch.randint(len(self.lat_mean), (batch_size,), generator=gen)
        mean, std = self.lat_mean[idx], self.lat_std[idx]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling
        prompts = [self._prompt(self.captions[i], gen) for i in idx.tolist()]
        if self.class_latents is not None:
            k = torch.randint(len(self.class_latents), (batch_size,), generator=gen)
            latents = torch.cat([latents, self.class_latents[k]])
            prompts += [self.class_prompt] * batch_size
        return latents, prompts

    def _prompt(self, caption: str | None, gen: torch.Generator) -> str:
        if caption is not None:
            return caption
        return self.templates[int(torch.randint(len(self.templates), (1,), generator=gen))].format(self.subject)


def learn_expert(
    concept: Concept,
    base: str | StableDiffusionPipeline,
    settings: LearnSettings,
    *,
    accelerator: Accelerator | None = None,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    data_parallel: bool = False,
    init_lora: dict[str, torch.Tensor] | None = None,
    regulariser: Regulariser | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Expert:
    """Learn `concept` on the frozen `base` model; returns the expert (not yet saved).

    `base` is a hub id or a local diffusers folder, or a loaded pipeline, which is used up (it gets the LoRA).
    With `checkpoint` (a file path), the training state is saved there every `settings.checkpoint_every` steps
    and removed at the end; `resume` continues from it, giving the same weights as an uninterrupted run.
    `cancel` is asked before every step (and every anchor): True raises `Cancelled`; nothing but the checkpoint
    has been written then (this function never writes a library).

    Under `torchrun` or `accelerate launch`, each process learns alone by default (concept-parallel: the
    expert is the same whichever process learns it, and however many there are). With `data_parallel`, all
    processes must call this for the same concept: they train it together with DDP, each drawing its own
    samples, so a step sees N x batch_size images; the result then depends on the number of processes (and a
    cancel must reach every process at the same step).

    For the continual baselines (`fl2t.methods`): `init_lora` starts the LoRA from these peft weights instead
    of zero (a LoRA continued task after task), and `regulariser` adds its term to every step's loss.
    """
    spec = concept.spec
    cpu = not torch.cuda.is_available()
    accelerator = accelerator or _accelerator(settings.mixed_precision, cpu)
    shared = data_parallel and accelerator.num_processes > 1
    rank = accelerator.process_index if shared else 0
    owner = accelerator.is_main_process or not shared  # writes and removes this concept's checkpoint
    # The draws, in this order, make the expert: global RNG (new token rows, LoRA init), then `gen` for the data.
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed + 1000 * rank)  # only data-parallel ranks need other samples
    device = accelerator.device

    pipe, base_info, size, weight_dtype = _frozen_base(base, spec, settings, accelerator)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    data = _training_data(concept, pipe, settings, size, device)  # class images drawn before the UNet gets its LoRA
    pipe.unet.to(device)
    if weight_dtype != torch.float32:
        pipe.unet.to(dtype=weight_dtype)
    ids, tokens = _concept_tokens(pipe, spec, settings)
    lora_params = _add_lora(pipe.unet, settings, init_lora)
    if settings.gradient_checkpointing:
        _enable_gradient_checkpointing(pipe)
    model = ExpertModel(pipe.unet, pipe.text_encoder, tokens).to(device)
    optimizer, lr_scheduler = _optimiser(lora_params, tokens.weight, settings)
    # The optimizer is prepared for fp16 loss scaling. The model only when sharing a concept: prepared on
    # several processes it becomes DDP and syncs gradients, which learning alone must not. The scheduler never:
    # accelerate's wrapper steps it once per process, so the schedule would depend on the number of processes.
    optimizer = accelerator.prepare(optimizer)
    if shared:
        model = accelerator.prepare(model)
    tokenize = _tokenizer(pipe)
    fingerprint = _fingerprint(concept, settings, base_info)
    start = 0
    if resume:
        start = _load_checkpoint(checkpoint, fingerprint, model, optimizer, lr_scheduler, gen, accelerator, rank)

    def data_loss(batch_size: int, gen: torch.Generator) -> torch.Tensor:
        """The diffusion loss of a fresh batch of the concept's images (and class images), noised afresh."""
        latents, prompts = data.sample(batch_size, gen)
        noisy, timesteps, target = _noised(latents, noise_scheduler, settings.noise_offset, gen)
        with accelerator.autocast():
            pred = model(noisy.to(device, weight_dtype), timesteps.to(device), tokenize(prompts).to(device)).float()
        prior_weight = settings.prior_weight if data.class_latents is not None else None
        return _denoising_loss(pred, target.to(device), prior_weight)

    if regulariser is not None:
        regulariser.start(model, tokenize)
    model.train()
    limit = settings.embedding_norm_limit
    stopped = limit is not None and bool(tokens.weight.norm(dim=-1).mean() >= limit)  # also on resume: once
    # stopped, the rows never change again, so their norm says whether they had stopped
    for step in range(start, settings.steps):
        kill_point(f"step:{step}")
        if cancel is not None and cancel():
            raise Cancelled(f"learning {spec.name!r} was cancelled at step {step}; nothing was added to the library")
        loss = data_loss(settings.batch_size, gen)
        if regulariser is not None:
            loss = loss + regulariser.loss(model, tokenize, gen)
        value = loss.item()  # the step's one host sync
        if not math.isfinite(value):
            raise Fl2tError(f"training diverged at step {step} (loss {value}); lower --lr or use mixed_precision no")
        accelerator.backward(loss)
        if regulariser is not None:
            regulariser.after_backward(model)
        if stopped:
            tokens.weight.grad = None  # AdamW leaves a parameter without a gradient as it is
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if limit is not None and not stopped:
            stopped = bool(tokens.weight.norm(dim=-1).mean() >= limit)
        if on_step is not None:
            on_step(step, value)
        done = step + 1
        if checkpoint is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0:
            if done < settings.steps:
                # Every data-parallel rank's sampling state goes into the one file: a resume continues each stream.
                gens = accelerator.gather(gen.get_state()[None].to(device)).cpu() if shared else gen.get_state()[None]
                if owner:
                    unwrapped = accelerator.unwrap_model(model)
                    _save_checkpoint(checkpoint, fingerprint, done, unwrapped, optimizer, lr_scheduler, gens)

    if regulariser is not None:
        regulariser.end(model, data_loss)
    model = accelerator.unwrap_model(model)
    model.eval()
    tokens.detach_hook()
    expert = _expert(spec, model.unet, tokens, base_info, settings)
    finish_expert(expert, _trained_pipeline(pipe, expert, tokens, ids), settings, cancel=cancel)
    if checkpoint is not None and owner:
        checkpoint.unlink(missing_ok=True)
    return expert


# -- set-up -----------------------------------------------------------------------------------------------------
def _accelerator(mixed_precision: str, cpu: bool) -> Accelerator:
    """An Accelerator with this mixed precision, also when an earlier one in this process had another (accelerate
    keeps one precision per process and refuses a change: learning at bf16 after learning at full precision, as
    `fl2t bench speed` and a long-lived app do). Only the precision's state is reset; the processes' (the
    distributed set-up) is kept."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _frozen_base(
    base: str | StableDiffusionPipeline, spec: ConceptSpec, settings: LearnSettings, accelerator: Accelerator
) -> tuple[StableDiffusionPipeline, dict[str, str], int, torch.dtype]:
    """The base pipeline, frozen, its VAE and text encoder on the device; its id, training size, weight dtype."""
    pipe = base if isinstance(base, StableDiffusionPipeline) else load_base(base)
    base_info = {"id": pipe.name_or_path or "in-memory", "config_hash": base_config_hash(pipe)}
    check_new_tokens(pipe.tokenizer, spec.tokens)
    size = settings.resolution or resolution_of(pipe)
    if size % pipe.vae_scale_factor:
        raise Fl2tError(f"resolution {size} is not a multiple of the VAE's downscale factor {pipe.vae_scale_factor}")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe.vae.to(accelerator.device)
    pipe.text_encoder.to(accelerator.device)
    if weight_dtype != torch.float32:
        pipe.text_encoder.to(dtype=weight_dtype)
    return pipe, base_info, size, weight_dtype


def _training_data(
    concept: Concept, pipe: StableDiffusionPipeline, settings: LearnSettings, size: int, device: torch.device
) -> TrainingData:
    """Class images from the base model (prior preservation, the UNet still without LoRA), and the reference
    images as latent distributions, encoded once; each step samples from them."""
    spec = concept.spec
    class_prompt = spec.stable_prompt.replace(spec.subject, spec.class_word if spec.kind == "object" else "a painting")
    class_latents = None
    if settings.prior_preservation:
        pipe.unet.to(device)
        out = pipe(
            class_prompt,
            num_images_per_prompt=settings.num_class_images,
            height=size,
            width=size,
            num_inference_steps=settings.anchor_steps,
            guidance_scale=settings.anchor_guidance,
            generator=torch.Generator().manual_seed(settings.seed),
            output_type="latent",
        )
        class_latents = out.images.float().cpu()  # (K, C, h, w), already scaled
    pixels = images_to_tensor(concept.images, size, settings.flip).to(device)
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist
    return TrainingData(
        lat_mean=dist.mean.float().cpu(),
        lat_std=dist.std.float().cpu(),
        scaling=pipe.vae.config.scaling_factor,
        captions=concept.captions * (2 if settings.flip else 1),
        templates=caption_templates(spec.kind),
        subject=spec.subject,
        class_prompt=class_prompt,
        class_latents=class_latents,
    )


def _concept_tokens(
    pipe: StableDiffusionPipeline, spec: ConceptSpec, settings: LearnSettings
) -> tuple[list[int], ConceptTokenEmbeddings]:
    """The concept's new token ids and their trainable rows, initialised from the class word; layer-wise, one
    copy per cross-attention layer (the UNet then gets the layer-wise processors)."""
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, spec.tokens)
    init = class_word_embedding(pipe.tokenizer, pipe.text_encoder, spec.class_word).expand(len(ids), -1)
    n_layers = set_layerwise_processors(pipe.unet) if settings.layerwise else None
    if n_layers:
        init = init.expand(n_layers, -1, -1)
    return ids, ConceptTokenEmbeddings(ids, init)


def _add_lora(
    unet: nn.Module, settings: LearnSettings, init_lora: dict[str, torch.Tensor] | None
) -> list[nn.Parameter]:
    """A rank-r peft LoRA on the chosen UNet layers (from `init_lora` if given); its parameters, in float32."""
    target = lora_target_regex(settings)
    found = {m.group(1) for n, _ in unet.named_modules() if (m := re.fullmatch(target, n))}
    for t in settings.lora_targets:  # a name that matches nothing would be silently left out by peft
        if t not in found:
            raise Fl2tError(
                f"lora_targets {t!r} matches no UNet layer in {settings.lora_attention} attention; experts adapt "
                "attention projections (to_q, to_k, to_v, to_out.0)"
            )
    r = settings.rank
    unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights=True, target_modules=target))
    if init_lora is not None:
        set_peft_model_state_dict(unet, init_lora)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    if not lora_params:
        raise Fl2tError(
            f"no UNet layer matches lora_targets {settings.lora_targets} in {settings.lora_attention} attention"
        )
    for p in lora_params:
        p.data = p.data.float()
    return lora_params


def _enable_gradient_checkpointing(pipe: StableDiffusionPipeline) -> None:
    pipe.unet.enable_gradient_checkpointing()
    te = pipe.text_encoder
    getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()


def _tokenizer(pipe: StableDiffusionPipeline) -> Tokenize:
    """Prompts -> input ids (B, T), padded to the text encoder's length."""
    t = pipe.tokenizer

    def tokenize(prompts: list[str]) -> torch.Tensor:
        ids = t(prompts, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt")
        return ids.input_ids

    return tokenize


def _optimiser(
    lora_params: list[nn.Parameter], token_weight: nn.Parameter, settings: LearnSettings
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with one learning rate for the LoRA and one for the token embeddings; linear decay to zero."""
    optimizer = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": settings.lr, "weight_decay": settings.weight_decay},
            {"params": [token_weight], "lr": settings.embedding_lr, "weight_decay": 0.0},
        ]
    )
    lr_scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=settings.steps)
    return optimizer, lr_scheduler


# -- one step ---------------------------------------------------------------------------------------------------
def _noised(
    latents: torch.Tensor, noise_scheduler: DDPMScheduler, noise_offset: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy latents, their timesteps (B,) and the target: the noise, or the velocity for v-prediction."""
    noise = torch.randn(latents.shape, generator=gen)
    if noise_offset:
        noise += noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, timesteps, noise_scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, noise


def _denoising_loss(pred: torch.Tensor, target: torch.Tensor, prior_weight: float | None) -> torch.Tensor:
    """MSE on the concept's images; with `prior_weight`, the second half of the batch is class images."""
    if prior_weight is None:
        return F.mse_loss(pred, target)
    pred, pred_prior = pred.chunk(2)
    target, target_prior = target.chunk(2)
    return F.mse_loss(pred, target) + prior_weight * F.mse_loss(pred_prior, target_prior)


# -- the result -------------------------------------------------------------------------------------------------
def _expert(
    spec: ConceptSpec,
    unet: nn.Module,
    tokens: ConceptTokenEmbeddings,
    base_info: dict[str, str],
    settings: LearnSettings,
) -> Expert:
    """The trained LoRA and embeddings as an Expert; `finish_expert` adds C_g and the anchors."""
    lora = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    return Expert(
        spec=spec,
        lora=lora,
        token_embeddings=tokens.weight.detach().float().cpu(),
        stable_embedding=torch.zeros(0),
        anchors=torch.zeros(0),
        anchor_prompts=[],
        base=base_info,
        settings=settings.model_dump(),
    )


def _trained_pipeline(
    pipe: StableDiffusionPipeline, expert: Expert, tokens: ConceptTokenEmbeddings, ids: list[int]
) -> ExpertPipeline:
    """The trained pipeline as the expert's pipeline: the same weights as loading the saved expert."""
    expert_pipe = ExpertPipeline(**pipe.components, requires_safety_checker=False)
    expert_pipe.set_progress_bar_config(disable=True)
    text_encoder = pipe.text_encoder
    if expert.layerwise:
        expert_pipe.token_hooks.append(tokens.attach(text_encoder))
    else:
        with torch.no_grad():
            rows = expert.token_embeddings.to(text_encoder.dtype).to(text_encoder.device)
            text_encoder.get_input_embeddings().weight[ids] = rows
    return expert_pipe


@torch.no_grad()
def finish_expert(
    expert: Expert, pipe: ExpertPipeline, settings: LearnSettings, *, cancel: Callable[[], bool] | None = None
) -> None:
    """Compute the stable concept embedding C_g and generate the synthetic anchors with the expert's pipeline."""
    spec = expert.spec
    device = pipe.unet.device
    # C_g: final hidden state at the concept token(s) of the template prompt; mean over tokens (and layers).
    t = pipe.tokenizer
    max_length = t.model_max_length
    ids = t(spec.stable_prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids = ids.input_ids.to(device)
    n_layers = expert.token_embeddings.shape[0] if expert.layerwise else None
    states = encode_layerwise(pipe.text_encoder, ids, pipe.token_hooks, n_layers)
    states = states.reshape(states.shape[0], -1, ids.shape[1], states.shape[-1])  # (1, L or 1, T, D)
    token_ids = torch.tensor(t.convert_tokens_to_ids(spec.tokens), device=device)
    at_token = torch.isin(ids[0], token_ids)
    expert.stable_embedding = states[0][:, at_token].float().mean(dim=(0, 1)).cpu()

    templates = caption_templates(spec.kind)
    prompts = [templates[i % len(templates)].format(spec.subject) for i in range(settings.num_anchors)]
    size = settings.resolution or resolution_of(pipe)
    latents = []
    for i, prompt in enumerate(prompts):
        if cancel is not None and cancel():
            raise Cancelled(f"learning {spec.name!r} was cancelled while generating its anchors; nothing was added")
        out = pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=settings.anchor_steps,
            guidance_scale=settings.anchor_guidance,
            generator=torch.Generator().manual_seed(settings.seed + i),
            output_type="latent",
        )
        latents.append(out.images.float().cpu())
    expert.anchors = torch.cat(latents) if latents else torch.zeros(0)
    expert.anchor_prompts = prompts


# -- checkpoints for --resume -----------------------------------------------------------------------------------
def _fingerprint(concept: Concept, settings: LearnSettings, base_info: dict[str, str]) -> str:
    """What a checkpoint is valid for: the same concept data, settings and base architecture."""
    what = [concept.spec.model_dump(), concept.captions, settings.model_dump(), base_info["config_hash"]]
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for im in concept.images:
        h.update(im.tobytes())
    return h.hexdigest()


def _save_checkpoint(
    path: Path,
    fingerprint: str,
    step: int,
    model: ExpertModel,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    gens: torch.Tensor,
) -> None:
    """The whole training state in one safetensors file (tensors + JSON metadata), replaced atomically.

    `gens`: the sampling generators' states, one row per data-parallel rank (one row when learning alone).
    """
    tensors = {f"param.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optimizer.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["generator"] = gens[0]
    for r in range(1, len(gens)):
        tensors[f"generator.{r}"] = gens[r]
    meta = {
        "fingerprint": fingerprint,
        "step": str(step),
        "param_groups": json.dumps(opt["param_groups"]),
        "lr_scheduler": json.dumps(lr_scheduler.state_dict()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta))


def _load_checkpoint(
    path: Path | None,
    fingerprint: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    accelerator: Accelerator,
    rank: int,
) -> int:
    """Put the saved training state back; returns the step to continue from."""
    if path is None or not path.is_file():
        raise Fl2tError(f"nothing to resume: no checkpoint at {path}; run without --resume to start over")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise Fl2tError(f"{path}: not a readable checkpoint ({e}); run without --resume to start over") from None
    if meta.get("fingerprint") != fingerprint:
        raise Fl2tError(f"{path}: checkpoint was made with other data or settings; run without --resume to start over")
    unwrapped = accelerator.unwrap_model(model)
    with torch.no_grad():
        for n, p in unwrapped.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"param.{n}"])
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    lr_scheduler.load_state_dict(json.loads(meta["lr_scheduler"]))
    # A rank the checkpoint has no stream for (resumed with more processes) continues rank 0's.
    gen.set_state(tensors.get(f"generator.{rank}", tensors["generator"]))
    return int(meta["step"])
