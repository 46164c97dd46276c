"""Step 2 training: consolidate a library's experts into proxies + decoder + heads, without replay.

One loop, top to bottom (`consolidate`). Each expert teaches its own concept on its cached synthetic anchors
(L_distill); prompts that name no concept must keep the base model's prediction (L_base); the decoded proxies are
tied to the concepts a prompt names by InfoNCE (L_con) and the relevance to them by the routing term; two-concept
prompts take part through these last two only. Order-agnostic: experts are sorted by content hash before any random
draw, and the seed comes from the set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from fl2t.config import ConsolidateSettings
from fl2t.consolidate.common import canonical, concepts_named, layer_shapes, prompt_states, set_hash
from fl2t.consolidate.model import ConceptRef, ConsolidatedConfig, ConsolidatedModel
from fl2t.data import OBJECT_TEMPLATES
from fl2t.errors import Cancelled, Fl2tError
from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.library import Library
from fl2t.parallel import accelerator_device
from fl2t.pipeline import ExpertPipeline


@dataclass
class PromptPool:
    """Every prompt Step 2 trains on, encoded once. Rows: Nc concept prompts (one per anchor), then Nb base prompts
    (naming no concept), then one two-concept prompt per pair."""

    unet_states: torch.Tensor  # (P, T or L*T, D): the UNet's conditioning
    text: torch.Tensor  # (P, T, d): the decoder's input
    pad: torch.Tensor  # (P, T): True where padding
    named: torch.Tensor  # (P, G): the share of each concept's tokens a prompt contains
    anchors: torch.Tensor  # (Nc, C, h, w): the latents each concept prompt's expert generated
    concept_of: torch.Tensor  # (Nc,): the concept of each concept prompt
    n_base: int  # Nb
    pairs: list[tuple[int, int]]  # the concepts of each two-concept prompt

    @property
    def n_concept(self) -> int:
        return len(self.concept_of)


@dataclass
class Batch:
    """One step's prompts: n_concept concept rows, n_base base rows (these go to the UNet), then two-concept rows."""

    rows: torch.Tensor  # (B,) prompt rows of the pool
    concepts: torch.Tensor  # (n_concept,) the concept each concept row names
    pairs: list[tuple[int, int]]  # the concepts each two-concept row names
    noisy: torch.Tensor  # (n_unet, C, h, w) noisy anchors
    t: torch.Tensor  # (n_unet,) timesteps
    states: torch.Tensor  # (n_unet, T or L*T, D) UNet conditioning
    n_concept: int
    n_base: int

    @property
    def n_unet(self) -> int:
        return self.n_concept + self.n_base


def build_pipeline(lib: Library, experts: list[Expert], base: str | None) -> ExpertPipeline:
    """The library's base with the experts' tokens, frozen, on this process's accelerator (its GPU if any)."""
    pipe, _ = ExpertPipeline.for_library(lib, base)
    for e in experts:
        pipe.add_expert_tokens(e)
    pipe.to(accelerator_device())
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
    return pipe


def new_model(
    pipe: ExpertPipeline, experts: list[Expert], settings: ConsolidateSettings
) -> tuple[ConsolidatedModel, AggregatedLoRA]:
    """A fresh consolidated model for the set (P_g initialised from C_g), its update hooked into `pipe`'s UNet."""
    stack = stack_experts(experts, pipe.unet)
    proxies = torch.stack([e.stable_embedding for e in experts])  # (G, d)
    config = ConsolidatedConfig(
        settings=settings,
        n_concepts=len(experts),
        width=proxies.shape[1],
        rank=stack.rank,
        layer_shapes=layer_shapes(pipe.unet, stack),
        set_hash=set_hash(experts),
        concepts=[ConceptRef(name=e.name, content_hash=e.content_hash) for e in experts],
    )
    model = ConsolidatedModel(config, proxies).to(pipe.unet.device)
    return model, AggregatedLoRA(pipe.unet, stack, model.shared_factors())


def consolidate(
    lib: Library,
    settings: ConsolidateSettings,
    *,
    base: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ConsolidatedModel:
    """Train the consolidated model for the library's current set of experts; returns it, not yet saved
    (`lib.save_consolidated(model.save_pretrained)` places it in the library). `cancel` is asked before every step:
    True raises `Cancelled`, and nothing has been written."""
    experts = _experts_to_consolidate(lib)
    seed = (int(set_hash(experts)[:15], 16) + settings.seed) % 2**63
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    pipe = build_pipeline(lib, experts, base)
    model, agg = new_model(pipe, experts, settings)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pool = _prompt_pool(pipe, experts, gen)
    sizes = _batch_sizes(settings, pool)
    model.init_routing(settings.route_margin)
    scalars = [model.match_scale, model.none_logit]  # the routing's scale and threshold learn faster than the weights
    rest = [p for p in model.parameters() if all(p is not q for q in scalars)]
    groups = [{"params": rest}, {"params": scalars, "lr": 10 * settings.lr}]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.0)

    for step in range(settings.steps):
        if cancel is not None and cancel():
            raise Cancelled(
                f"consolidating {lib.path} was cancelled at step {step}; its consolidated model is unchanged"
            )
        batch = _draw_batch(pool, sizes, noise_scheduler, gen, pipe.unet.device)
        with torch.no_grad():  # teachers: expert g alone for its concept's prompts, the base model for the rest
            agg.set(_teacher_weights(batch, len(agg.stack.modules), len(experts)))
            target = pipe.unet(batch.noisy, batch.t, batch.states).sample

        alpha, gamma, z = model(pool.text[batch.rows], pool.pad[batch.rows], pool.named[batch.rows])
        n = batch.n_unet
        agg.set(alpha[:n], None if gamma is None else gamma[:n], shared=True)
        pred = pipe.unet(batch.noisy, batch.t, batch.states).sample
        agg.off()
        loss = _loss(model, pool, batch, alpha, z, pred, target, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.item())

    agg.remove()
    return model


# -- set-up -----------------------------------------------------------------------------------------------------
def _experts_to_consolidate(lib: Library) -> list[Expert]:
    """The library's experts in canonical order; each must have synthetic anchors."""
    experts = canonical(lib.experts())
    if not experts:
        raise Fl2tError(f"library {lib.path}: has no concepts to consolidate; learn one first")
    bad = [e.name for e in experts if e.anchors.numel() == 0]
    if bad:
        raise Fl2tError(
            f"concept {bad[0]!r} has no synthetic anchors (learned with num_anchors 0); relearn it with --replace"
        )
    return experts


def _prompt_pool(pipe: ExpertPipeline, experts: list[Expert], gen: torch.Generator) -> PromptPool:
    """Concept prompts (one per anchor), base prompts from the class words, two-concept prompts; all encoded."""
    G = len(experts)
    concept_items = [(p, e.anchors[i], g) for g, e in enumerate(experts) for i, p in enumerate(e.anchor_prompts)]
    class_words = sorted({e.spec.class_word for e in experts})
    base_prompts = [t.format(w) for w in class_words for t in OBJECT_TEMPLATES[:4]]
    pairs = [(g, k) for g in range(G) for k in range(g + 1, G)]
    if len(pairs) > 4 * G:  # keep Step 2 linear in G: 4 two-concept prompts per concept, drawn from the set's seed
        keep = torch.randperm(len(pairs), generator=gen)[: 4 * G].sort().values
        pairs = [pairs[i] for i in keep.tolist()]
    multi_prompts = [f"a photo of {experts[g].spec.subject} and {experts[k].spec.subject}" for g, k in pairs]
    prompts = [p for p, _, _ in concept_items] + base_prompts + multi_prompts
    unet_states, text, pad = prompt_states(pipe, prompts)
    return PromptPool(
        unet_states=unet_states,
        text=text,
        pad=pad,
        named=concepts_named(pipe, experts, prompts),
        anchors=torch.stack([x for _, x, _ in concept_items]).to(pipe.unet.device),
        concept_of=torch.tensor([g for _, _, g in concept_items]),
        n_base=len(base_prompts),
        pairs=pairs,
    )


def _batch_sizes(settings: ConsolidateSettings, pool: PromptPool) -> tuple[int, int, int]:
    """Concept, base and two-concept prompts per step."""
    n_base = round(settings.batch_size * settings.base_share) if pool.n_base else 0
    n_multi = round(settings.batch_size * settings.multi_share) if pool.pairs else 0
    return max(1, settings.batch_size - n_base - n_multi), n_base, n_multi


# -- one step ---------------------------------------------------------------------------------------------------
def _draw_batch(
    pool: PromptPool,
    sizes: tuple[int, int, int],
    noise_scheduler: DDPMScheduler,
    gen: torch.Generator,
    device: torch.device,
) -> Batch:
    """Prompt rows, and noisy anchors for the rows that go to the UNet (base prompts on any concept's anchor)."""
    n_concept, n_base, n_multi = sizes
    Nc, Nb = pool.n_concept, pool.n_base
    none = torch.zeros(0, dtype=torch.long)
    ci = torch.randint(Nc, (n_concept,), generator=gen)
    bi = torch.randint(Nb, (n_base,), generator=gen) if n_base else none
    mi = torch.randint(len(pool.pairs), (n_multi,), generator=gen) if n_multi else none
    rows = torch.cat([ci, Nc + bi, Nc + Nb + mi])
    x0 = pool.anchors[torch.cat([ci, torch.randint(Nc, (n_base,), generator=gen)])]
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
    return Batch(
        rows=rows,
        concepts=pool.concept_of[ci],
        pairs=[pool.pairs[m] for m in mi.tolist()],
        noisy=noise_scheduler.add_noise(x0, noise, t),
        t=t,
        states=pool.unet_states[rows[: len(x0)]],
        n_concept=n_concept,
        n_base=n_base,
    )


def _teacher_weights(batch: Batch, L: int, G: int) -> torch.Tensor:
    """alpha (n_unet, L, G) of the teachers: one-hot on the concept for concept rows, zero (the base) for the rest."""
    teach = torch.zeros(batch.n_unet, L, G, device=batch.noisy.device)
    teach[torch.arange(batch.n_concept), :, batch.concepts] = 1.0
    return teach


def _loss(
    model: ConsolidatedModel,
    pool: PromptPool,
    batch: Batch,
    alpha: torch.Tensor,
    z: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    settings: ConsolidateSettings,
) -> torch.Tensor:
    """L = L_distill + λ_base L_base + λ_con L_con + λ_route L_route; alpha (B, L, G), z (B, G, d)."""
    nc = batch.n_concept
    loss = F.mse_loss(pred[:nc], target[:nc])
    if batch.n_base:
        loss = loss + settings.lambda_base * F.mse_loss(pred[nc:], target[nc:])
    if model.prompt_proj is not None:
        loss = loss + settings.lambda_con * _contrastive_loss(model, pool, batch, z, settings.temperature)
    if settings.lambda_route:
        loss = loss + settings.lambda_route * _routing_loss(batch, alpha)
    return loss


def _contrastive_loss(
    model: ConsolidatedModel, pool: PromptPool, batch: Batch, z: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE over the rows that name a concept: the concept row's own, both of a two-concept row's."""
    positives = torch.zeros(len(batch.rows), z.shape[1], dtype=torch.bool, device=z.device)  # (B, G)
    positives[torch.arange(batch.n_concept), batch.concepts] = True
    for j, pair in enumerate(batch.pairs):
        positives[batch.n_unet + j, list(pair)] = True
    named = positives.any(-1)
    text, pad = pool.text[batch.rows][named], pool.pad[batch.rows][named]
    return model.contrastive_loss(text, pad, z[named], positives[named], temperature)


def _routing_loss(batch: Batch, alpha: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the relevance (mean over layers, "none" last) against the concepts each row names.

    The distillation's gradient on alpha alone is weak (alpha stayed near uniform without this term)."""
    G = alpha.shape[-1]
    route = torch.zeros(len(batch.rows), G + 1, device=alpha.device)  # (B, G + 1)
    route[torch.arange(batch.n_concept), batch.concepts] = 1.0
    route[batch.n_concept : batch.n_unet, G] = 1.0
    for j, pair in enumerate(batch.pairs):
        route[batch.n_unet + j, list(pair)] = 0.5
    probs = torch.cat([alpha, (1 - alpha.sum(-1, keepdim=True)).clamp(min=0)], dim=-1).mean(1)  # (B, G + 1)
    return -(route * probs.clamp(min=1e-8).log()).sum(-1).mean()
