"""Training the tiny world's models from scratch: the VAE, the CLIP evaluator, the base UNet + text encoder.
Each is one plain loop, seeded, on CPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel

from fl2t.models import clip_tokenizer
from fl2t.world.generator import (
    BACKGROUNDS,
    COLOURS,
    GENERIC_STYLES,
    PATTERNS,
    POSITIONS,
    SHAPES,
    STYLES,
    PairScene,
    Scene,
    pair_caption,
    random_caption,
    render_any,
)
from fl2t.worldkit import models

Tick = Callable[[int], None]  # advances a progress bar by n steps


@dataclass
class Dataset:
    """Rendered pictures as uint8 (N, 3, side, side) and the scenes they show."""

    scenes: list[Scene | PairScene]
    pixels: np.ndarray

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        """(B, 3, side, side) float in [-1, 1]."""
        return torch.from_numpy(self.pixels[idx].astype(np.float32) / 127.5 - 1.0)

    @property
    def world_v2(self) -> bool:
        return is_world_v2(self.scenes)


def is_world_v2(scenes: Sequence[Scene | PairScene]) -> bool:
    """Whether the pictures include world v2's two-object scenes or generic styles."""
    return any(isinstance(s, PairScene) or s.style in GENERIC_STYLES for s in scenes)


def render_dataset(scenes: Sequence[Scene | PairScene], tick: Tick, side: int = models.SIZE) -> Dataset:
    pixels = np.empty((len(scenes), 3, side, side), np.uint8)
    for i, s in enumerate(scenes):
        pixels[i] = np.asarray(render_any(s, side)).transpose(2, 0, 1)
        if i % 500 == 499:
            tick(500)
    return Dataset(list(scenes), pixels)


@lru_cache(maxsize=1)
def _tok():
    return clip_tokenizer()


@lru_cache(maxsize=50_000)
def _ids(text: str) -> tuple[int, ...]:
    return tuple(_tok()(text, padding="max_length", max_length=77, truncation=True).input_ids)


def token_ids(texts: Sequence[str]) -> torch.Tensor:
    """(B, 77) CLIP token ids, padded with end-of-text as the SD pipeline pads."""
    return torch.tensor([_ids(t) for t in texts])


def drop_summaries(ids: torch.Tensor, states: torch.Tensor, empty: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """`states` (B, 77, W) of captions `ids` (B, 77) with, in the rows where `drop` (B,) is True, the end token and
    every position after it replaced by the empty caption's states there (`empty`, (1, 77, W))."""
    end = (ids == _tok().eos_token_id).int().argmax(dim=1)  # (B,) the first end token
    summary = drop[:, None] & (torch.arange(ids.shape[1])[None, :] >= end[:, None])  # (B, 77)
    return torch.where(summary[..., None], empty, states)


def zero_unused_rows(embedding: torch.nn.Embedding, used: set[int]) -> None:
    """Zero the token rows the world never uses. They get no gradient and stay zero, so the shipped
    file compresses well and a word the world never taught maps to the same neutral vector."""
    with torch.no_grad():
        keep = torch.zeros(embedding.num_embeddings, dtype=torch.bool)
        keep[list(used)] = True
        embedding.weight[~keep] = 0.0


def world_token_ids(v2: bool = False) -> set[int]:
    """Every token id of every word the world's captions and prompts use; `v2` adds world v2's words (two-object
    captions, generic styles), left out otherwise so that a rebuild of the v1 world (`--v1`) stays byte-identical."""
    return {i for w in world_words(v2) for i in _ids(w)}


def world_words(v2: bool = False) -> list[str]:
    """The words of the world's captions and prompts (`world_token_ids`)."""
    from fl2t.world.concepts import CONCEPTS, PROMPT_TEMPLATES
    from fl2t.world.generator import PATTERN_WORDS, SIZES, STYLE_WORDS

    words = [*SHAPES, *COLOURS, *BACKGROUNDS, *POSITIONS, *SIZES, *STYLE_WORDS.values(), "style"]
    words += [w.format(c="red", c2="blue") for w in PATTERN_WORDS.values()]
    words += [t.format("star") for kind in PROMPT_TEMPLATES.values() for t in kind]
    words += [c.class_word for c in CONCEPTS]
    words += ["a on a background, of the", ""]
    if v2:
        words += ["to the left of", "to the right of", *GENERIC_STYLES]
    return words


def _lr(step: int, total: int | None, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak (constant when `total` is None)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


# ---------------------------------------------------------------- VAE


def train_vae(data: Dataset, steps: int, seed: int, tick: Tick, batch: int = 64, **architecture: Any) -> AutoencoderKL:
    """Reconstruction (L1 + MSE) with a light KL term; sets `scaling_factor` so latents have unit std.
    `architecture`: `models.new_vae`'s overrides (none in a build)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = models.new_vae(**architecture)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, 2e-3, warmup=50))
        x = data.batch(rng.integers(len(data.scenes), size=batch))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick(1)
    vae.eval()
    with torch.no_grad():
        z = vae.encode(data.batch(np.arange(min(2048, len(data.scenes))))).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, data: Dataset, tick: Tick, batch: int = 256) -> torch.Tensor:
    """(N, 4, side / 2, side / 2) scaled latent means of every picture."""
    out = []
    for i in range(0, len(data.scenes), batch):
        x = data.batch(np.arange(i, min(i + batch, len(data.scenes))))
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
        tick(x.shape[0])
    return torch.cat(out)


# ---------------------------------------------------------------- evaluator

# Attribute heads used only while training the evaluator: they make the image tower learn every
# attribute quickly; only the CLIPModel is kept.
_ATTRIBUTES: dict[str, tuple[str | None, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "position": tuple(POSITIONS),
    "pattern": (None, *PATTERNS),
    "style": (None, *STYLES),
}


def _attributes(v2: bool) -> dict[str, tuple[str | None, ...]]:
    if not v2:
        return _ATTRIBUTES
    return {**_ATTRIBUTES, "style": (None, *STYLES, *GENERIC_STYLES)}


def _labels(scenes: Sequence[Scene | PairScene], attr: str, values: tuple[str | None, ...]) -> torch.Tensor:
    """Each picture's class of `attr`; -100 (ignored) for two-object scenes, and for the background of a pastel or
    neon picture (their palettes replace it)."""
    labels = []
    for s in scenes:
        hidden = isinstance(s, PairScene) or (attr == "background" and s.style in ("pastel", "neon"))
        labels.append(-100 if hidden else values.index(getattr(s, attr)))
    return torch.tensor(labels)


def swapped_shapes(pair: PairScene) -> PairScene:
    """The same two objects' colours and patterns where they are, their shapes exchanged: a caption of it names every
    word of `pair`'s, bound the other way ("a blue star to the left of a red ring" for "a blue ring to the left of a
    red star")."""
    return replace(
        pair, left=replace(pair.left, shape=pair.right.shape), right=replace(pair.right, shape=pair.left.shape)
    )


def _captions(
    scenes: Sequence[Scene | PairScene], rng: np.random.Generator, pairs_left_first: bool, hard_negatives: bool
) -> tuple[list[str], list[str]]:
    """Each picture's caption, and (with `hard_negatives`) for each two-object scene the same caption of its
    `swapped_shapes` scene, a text that only a tower binding attributes to objects can tell apart (NegCLIP's
    swapped-attribute negatives, Yuksekgonul et al., ICLR 2023)."""
    if not hard_negatives:
        return [random_caption(s, rng, pairs_left_first) for s in scenes], []
    texts, negatives = [], []
    for s in scenes:
        if isinstance(s, PairScene):
            left_first, background = pairs_left_first or rng.random() < 0.5, rng.random() < 0.85
            texts.append(pair_caption(s, left_first, background))
            negatives.append(pair_caption(swapped_shapes(s), left_first, background))
        else:
            texts.append(random_caption(s, rng, pairs_left_first))
    return texts, negatives


def train_evaluator(
    data: Dataset,
    steps: int,
    seed: int,
    tick: Tick,
    batch: int = 128,
    pairs_left_first: bool = False,
    hard_negatives: bool = False,
) -> CLIPModel:
    """CLIP's symmetric contrastive loss (pictures with the same caption count as positives of each
    other) plus attribute heads on the image embedding.
    hard_negatives: each two-object picture's caption with the shapes exchanged is one more text every picture of the
    batch is contrasted with (`_captions`); the text-to-image direction is over the pictures' own captions only."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = models.new_evaluator()
    zero_unused_rows(model.text_model.get_input_embeddings(), world_token_ids(data.world_v2))
    dim = model.config.projection_dim
    attributes = _attributes(data.world_v2)
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(dim, len(v)) for a, v in attributes.items()})
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    model.train()
    for step in range(steps):
        _set_lr(opt, _lr(step, steps, 1e-3))
        idx = rng.integers(len(data.scenes), size=batch)
        scenes = [data.scenes[i] for i in idx]
        texts, negatives = _captions(scenes, rng, pairs_left_first, hard_negatives)
        out = model(input_ids=token_ids(texts + negatives), pixel_values=data.batch(idx), return_loss=False)
        same = torch.tensor([[a == b for b in texts + negatives] for a in texts], dtype=torch.float32)  # (B, B + K)
        logits = out.logits_per_image  # (B images, B + K texts), already scaled by the learned temperature
        own = same[:, :batch]
        loss = 0.5 * (
            F.cross_entropy(logits, same / same.sum(1, keepdim=True))
            + F.cross_entropy(logits[:, :batch].t(), own / own.sum(1, keepdim=True))
        )
        img = out.image_embeds  # (B, dim), unit norm
        for attr, head in heads.items():
            loss = loss + 0.3 * F.cross_entropy(
                head(img * 10), _labels(scenes, attr, attributes[attr]), ignore_index=-100
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick(1)
    model.eval()
    return model


# ---------------------------------------------------------------- base model


class EMA:
    """Exponential moving average of a module's parameters (decay warms up from 0)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p, 1 - d)


def train_base(
    latents: torch.Tensor,
    scenes: Sequence[Scene | PairScene],
    steps: int,
    seed: int,
    tick: Tick,
    batch: int = 32,
    caption_dropout: float = 0.1,
    min_snr_gamma: float = 5.0,
    log: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
    text_layers: int = 2,
    transformer_layers: int = 1,
    pairs_left_first: bool = False,
    init: tuple[UNet2DConditionModel, CLIPTextModel] | None = None,
    summary_dropout: float = 0.0,
    frozen_text: CLIPTextModel | None = None,
) -> tuple[UNet2DConditionModel, CLIPTextModel, int]:
    """UNet and text encoder from scratch (or from `init`) on (latent, caption) pairs; returns their EMA copies
    and the number of steps trained.

    The learning rate is constant after warm-up and the EMA does the annealing, so the model after N
    steps of a longer run equals the model of an N-step run: `stop()` (checked every step) may end
    training early, and a build with `steps` set to the returned count reproduces it.
    v-prediction loss with min-SNR weighting (weight min(SNR, gamma) / (SNR + 1)), which trains the
    tiny model several times faster than uniform weighting.
    init: continue from these models (an experiment's starting point) instead of new ones.
    summary_dropout: the share of captions whose end token and the padding after it (each a summary of the whole
    caption in a causal text encoder) are replaced by the empty caption's, so that the UNet must read the words'
    own tokens; the sampling pipeline is unchanged (an experiment, off in every build).
    frozen_text: a text encoder trained before and kept frozen, as Stable Diffusion keeps CLIP's text tower, instead
    of one trained with the UNet (an experiment, off in every build); it is returned as given.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if init:
        unet, text = init
    else:
        unet = models.new_unet(latents.shape[-1], transformer_layers)
        text = models.new_text_encoder(text_layers)
        zero_unused_rows(text.get_input_embeddings(), world_token_ids(is_world_v2(scenes)))
    if frozen_text is not None:
        text = frozen_text.eval().requires_grad_(False)
    sched = models.train_scheduler()
    alphas = sched.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas).clamp(min=1e-8)
    weight = torch.minimum(snr, torch.full_like(snr, min_snr_gamma)) / (snr + 1)  # (1000,)
    params = [*unet.parameters(), *([] if frozen_text is not None else text.parameters())]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ema_unet = EMA(unet, 0.995)
    ema_text = EMA(text, 0.995) if frozen_text is None else None  # a frozen tower is its own average
    unet.train()
    text.train(frozen_text is None)
    gen = torch.Generator().manual_seed(seed)
    running = 0.0
    done = 0
    for step in range(steps):
        if stop and stop():
            break
        _set_lr(opt, _lr(step, None, 1e-3))
        idx = rng.integers(len(scenes), size=batch)
        texts = [
            "" if rng.random() < caption_dropout else random_caption(scenes[i], rng, pairs_left_first) for i in idx
        ]
        x0 = latents[idx]  # (B, 4, side / 2, side / 2)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t)
        ids = token_ids(texts)
        cond = text(ids).last_hidden_state  # (B, 77, TEXT_WIDTH)
        if summary_dropout:
            drop = torch.rand(batch, generator=gen) < summary_dropout
            cond = drop_summaries(ids, cond, text(token_ids([""])).last_hidden_state, drop)
        pred = unet(xt, t, cond).sample
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (weight[t] * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet)
        if ema_text is not None:
            ema_text.update(text)
        running = 0.99 * running + 0.01 * loss.item()
        if log and step % 250 == 249:
            log(f"base step {step + 1}/{steps}: loss {running / (1 - 0.99 ** (step + 1)):.4f}")
        tick(1)
        done = step + 1
    return ema_unet.module, text if ema_text is None else ema_text.module, done
