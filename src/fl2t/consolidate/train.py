"""Step 2 training: consolidate a library's experts into proxies + decoder + heads, without replay.

One loop, top to bottom (`consolidate`). Each expert teaches its own concept on its cached synthetic anchors
(L_distill); prompts that name no concept must keep the base model's prediction (L_base); two-concept prompts match
the composition teacher on its pair anchors (L_pair, `pairs.py`); the decoded proxies are tied to the concepts a
prompt names by InfoNCE (L_con), and each concept's relevance to whether the prompt names it by a binary
cross-entropy (L_route, on the UNet rows and `route_batch` more prompts through the decoder alone). Order-agnostic:
experts are sorted by content hash before any random draw, the seed comes from the set, pairs from their hashes.
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
from fl2t.consolidate.pairs import AttentionProbe, CompositionTeacher, pair_anchors, routed_prediction, trained_pairs
from fl2t.data import OBJECT_TEMPLATES
from fl2t.errors import Cancelled, Fl2tError
from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.library import Library
from fl2t.parallel import accelerator_device
from fl2t.pipeline import ExpertPipeline
from fl2t.span import SpanKV, prompt_ids


@dataclass
class PromptPool:
    """Every prompt Step 2 trains on, encoded once. Rows: Nc concept prompts (one per anchor), then Nb base prompts
    (naming no concept), then Np pair prompts (one per pair anchor), then prompts for the relevance heads alone."""

    unet_states: torch.Tensor  # (P, T or L*T, D): the UNet's conditioning
    text: torch.Tensor  # (P, T, d): the decoder's input
    pad: torch.Tensor  # (P, T): True where padding
    ids: torch.Tensor  # (P, T): token ids
    named: torch.Tensor  # (P, G): 1 for each concept the prompt names (what the relevance is taught)
    tokens: torch.Tensor  # (P, G): the share of each concept's tokens the prompt contains (the heads' token input)
    anchors: torch.Tensor  # (Nc + Np, C, h, w): each concept prompt's expert latents, then each pair prompt's teacher's
    n_concept: int  # Nc
    n_base: int  # Nb

    @property
    def n_pair(self) -> int:
        return len(self.anchors) - self.n_concept


@dataclass
class Batch:
    """One step's UNet rows: n_concept concept rows, n_base base rows, n_pair pair rows."""

    rows: torch.Tensor  # (B,) prompt rows of the pool
    noisy: torch.Tensor  # (B, C, h, w) noisy anchors
    t: torch.Tensor  # (B,) timesteps
    n_concept: int
    n_base: int


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
    True raises `Cancelled`, and nothing has been written. With `relevance: lookup` nothing is trained: the model
    records the set, and a prompt's weights are the lookup (`ConsolidatedModel.weights`)."""
    experts = _experts_to_consolidate(lib, anchors=settings.relevance == "learned")
    seed = (int(set_hash(experts)[:15], 16) + settings.seed) % 2**63
    torch.manual_seed(seed)  # the model's initial weights: saved even by the lookup, the same for the same set
    gen = torch.Generator().manual_seed(seed)
    if settings.relevance == "lookup":
        pipe, _ = ExpertPipeline.for_library(lib, base)
        model, agg = new_model(pipe, experts, settings)
        agg.remove()
        return model

    pipe = build_pipeline(lib, experts, base)
    model, agg = new_model(pipe, experts, settings)
    span = SpanKV(pipe.unet, agg.stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in experts])
    teacher, probe = CompositionTeacher(agg, span), AttentionProbe(pipe.unet)
    model.pair_anchors = _pair_anchors(lib, pipe, experts, settings, cancel)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pool = _prompt_pool(pipe, experts, settings, model.pair_anchors, gen)
    sizes = _batch_sizes(settings, pool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)

    for step in range(settings.steps):
        if cancel is not None and cancel():
            raise Cancelled(
                f"consolidating {lib.path} was cancelled at step {step}; its consolidated model is unchanged"
            )
        batch = _draw_batch(pool, sizes, noise_scheduler, gen, pipe.unet.device)
        n = len(batch.rows)
        states, ids, named = pool.unet_states[batch.rows], pool.ids[batch.rows], pool.named[batch.rows]
        with torch.no_grad():  # the teachers
            pair_rows = torch.arange(n) >= batch.n_concept + batch.n_base
            teacher.arm(ids, named, pair_rows & (settings.pair_teacher == "span"))
            target = pipe.unet(batch.noisy, batch.t, states).sample
            teacher.off()
            if settings.pair_teacher == "routed" and pair_rows.any():
                k = pair_rows.nonzero()[:, 0]
                pairs = [tuple(named[i].nonzero()[:, 0].tolist()) for i in k.tolist()]
                spans = span.spans(ids[k])
                target[k] = routed_prediction(
                    pipe.unet, agg, probe, batch.noisy[k], batch.t[k], states[k], spans, pairs
                )

        rows = torch.cat([batch.rows, torch.randint(len(pool.named), (settings.route_batch,), generator=gen)])
        alpha, gamma, z = model(pool.text[rows], pool.pad[rows], pool.tokens[rows])
        a, g = alpha[:n], None if gamma is None else gamma[:n]
        if settings.span:
            a = span.arm(ids, a, g, guided=False)
        agg.set(a, g, shared=True)
        pred = pipe.unet(batch.noisy, batch.t, states).sample
        teacher.off()
        loss = _loss(model, pool, batch, rows, alpha, z, pred, target, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.item())

    span.remove()
    agg.remove()
    return model


# -- set-up -----------------------------------------------------------------------------------------------------
def _experts_to_consolidate(lib: Library, anchors: bool) -> list[Expert]:
    """The library's experts in canonical order; with `anchors`, each must have synthetic anchors."""
    experts = canonical(lib.experts())
    if not experts:
        raise Fl2tError(f"library {lib.path}: has no concepts to consolidate; learn one first")
    bad = [e.name for e in experts if anchors and e.anchors.numel() == 0]
    if bad:
        raise Fl2tError(
            f"concept {bad[0]!r} has no synthetic anchors (learned with num_anchors 0); relearn it with --replace"
        )
    return experts


def _pair_anchors(
    lib: Library,
    pipe: ExpertPipeline,
    experts: list[Expert],
    settings: ConsolidateSettings,
    cancel: Callable[[], bool] | None,
) -> dict[str, torch.Tensor]:
    """The composition teacher's latents for every trained pair: those the current consolidated model kept, the
    others generated now."""
    pairs = trained_pairs(experts, settings) if settings.pair_share and settings.pairs_per_concept else []
    if not pairs:
        return {}
    try:
        kept = ConsolidatedModel.load_pair_anchors(lib.consolidated_dir())
    except Fl2tError:  # no consolidated model yet (or a damaged one): nothing to reuse
        kept = {}
    size = experts[0].anchors.shape[-1] * pipe.vae_scale_factor
    out = {}
    for pair in pairs:
        if pair.key in kept and len(kept[pair.key]) == len(pair.prompts):
            out[pair.key] = kept[pair.key]
            continue
        if cancel is not None and cancel():
            raise Cancelled(
                f"consolidating {lib.path} was cancelled while generating pair anchors; nothing was written"
            )
        out[pair.key] = pair_anchors(pipe, (experts[pair.first], experts[pair.second]), pair, size, settings)
    return out


# Everyday prompt words for the relevance heads' extra prompts: a concept named amid any words must be found by its
# tokens, not by the templates it was taught with. Generic on purpose (no benchmark's evaluation prompts).
CONTEXT_WORDS = (
    "a an the of in on at with and by near next to under over beside behind photo picture painting drawing image "
    "rendering close-up small large big tiny bright dark clean old new red green blue yellow purple orange black "
    "white gray pink brown background left right top bottom center middle corner scene outdoors indoors table grass "
    "sky water street room light shadow soft sharp style colorful simple detailed one two"
).split()
ROUTE_PROMPTS = 64  # per concept, per pair and (naming none) per concept


def _route_prompts(
    experts: list[Expert], pairs: list[tuple[int, int]], gen: torch.Generator
) -> list[tuple[str, tuple[int, ...]]]:
    """Prompts of 2-9 random everyday words with the subjects of none, one or two concepts inserted at random places,
    and what each names. A prompt naming none holds a concept's class word instead, half the time; a prompt naming one
    concept holds another concept's class word besides, half the time (a style is named beside an object's noun: taught
    only on prompts where class words mean "none", the heads ran the styles at half strength on "a red circle in the
    style of <s-pastel>")."""

    def words(n: int) -> list[str]:
        return [CONTEXT_WORDS[i] for i in torch.randint(len(CONTEXT_WORDS), (n,), generator=gen).tolist()]

    def prompt(subjects: list[str]) -> str:
        out = words(int(torch.randint(2, 10, (1,), generator=gen)))
        for subject in subjects:
            out.insert(int(torch.randint(len(out) + 1, (1,), generator=gen)), subject)
        return " ".join(out)

    def other_class_word(g: int) -> list[str]:
        k = int(torch.randint(len(experts) - 1, (1,), generator=gen))
        return [experts[k + (k >= g)].spec.class_word]

    items = []
    for g, e in enumerate(experts):
        items += [
            (prompt([e.spec.subject] + (other_class_word(g) if k % 2 and len(experts) > 1 else [])), (g,))
            for k in range(ROUTE_PROMPTS)
        ]
        items += [(prompt([e.spec.class_word] if k % 2 else []), ()) for k in range(ROUTE_PROMPTS)]
    for g, k in pairs:
        subjects = [experts[g].spec.subject, experts[k].spec.subject]
        items += [(prompt(subjects), (g, k)) for _ in range(ROUTE_PROMPTS)]
    return items


def _prompt_pool(
    pipe: ExpertPipeline,
    experts: list[Expert],
    settings: ConsolidateSettings,
    pair_anchors: dict[str, torch.Tensor],
    gen: torch.Generator,
) -> PromptPool:
    """Concept prompts (one per anchor), base prompts from the class words, pair prompts (one per pair anchor)."""
    G = len(experts)
    concept_items = [(p, e.anchors[i], g) for g, e in enumerate(experts) for i, p in enumerate(e.anchor_prompts)]
    class_words = sorted({e.spec.class_word for e in experts})
    base_prompts = [t.format(w) for w in class_words for t in OBJECT_TEMPLATES[:4]]
    pairs = [p for p in trained_pairs(experts, settings) if p.key in pair_anchors]
    pair_items = [(prompt, pair_anchors[p.key][i], p) for p in pairs for i, prompt in enumerate(p.prompts)]
    route = _route_prompts(experts, [(p.first, p.second) for p in pairs], gen)
    prompts = [p for p, _, _ in concept_items] + base_prompts + [p for p, _, _ in pair_items] + [p for p, _ in route]
    named = torch.zeros(len(prompts), G)
    for i, (_, _, g) in enumerate(concept_items):
        named[i, g] = 1.0
    for i, (_, _, p) in enumerate(pair_items):
        named[len(concept_items) + len(base_prompts) + i, [p.first, p.second]] = 1.0
    for i, (_, names) in enumerate(route):
        named[len(prompts) - len(route) + i, list(names)] = 1.0
    unet_states, text, pad = prompt_states(pipe, prompts)
    device = pipe.unet.device
    return PromptPool(
        unet_states=unet_states,
        text=text,
        pad=pad,
        ids=prompt_ids(pipe.tokenizer, prompts),
        named=named.to(device),
        tokens=concepts_named(pipe, experts, prompts),
        anchors=torch.stack([x for _, x, _ in concept_items] + [x for _, x, _ in pair_items]).to(device),
        n_concept=len(concept_items),
        n_base=len(base_prompts),
    )


def _batch_sizes(settings: ConsolidateSettings, pool: PromptPool) -> tuple[int, int, int]:
    """Concept, base and pair prompts per step (at least one pair prompt when the set has pairs)."""
    n_base = round(settings.batch_size * settings.base_share) if pool.n_base else 0
    n_pair = max(1, round(settings.batch_size * settings.pair_share)) if pool.n_pair else 0
    return max(1, settings.batch_size - n_base - n_pair), n_base, n_pair


# -- one step ---------------------------------------------------------------------------------------------------
def _draw_batch(
    pool: PromptPool,
    sizes: tuple[int, int, int],
    noise_scheduler: DDPMScheduler,
    gen: torch.Generator,
    device: torch.device,
) -> Batch:
    """Prompt rows and their noisy anchors (a base prompt on any concept's anchor)."""
    n_concept, n_base, n_pair = sizes
    Nc, Nb = pool.n_concept, pool.n_base
    none = torch.zeros(0, dtype=torch.long)
    ci = torch.randint(Nc, (n_concept,), generator=gen)
    bi = torch.randint(Nb, (n_base,), generator=gen) if n_base else none
    pi = torch.randint(pool.n_pair, (n_pair,), generator=gen) if n_pair else none
    rows = torch.cat([ci, Nc + bi, Nc + Nb + pi])
    x0 = pool.anchors[torch.cat([ci, torch.randint(Nc, (n_base,), generator=gen), Nc + pi])]
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
    return Batch(rows=rows, noisy=noise_scheduler.add_noise(x0, noise, t), t=t, n_concept=n_concept, n_base=n_base)


def _loss(
    model: ConsolidatedModel,
    pool: PromptPool,
    batch: Batch,
    rows: torch.Tensor,
    alpha: torch.Tensor,
    z: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    settings: ConsolidateSettings,
) -> torch.Tensor:
    """L = L_distill + λ_base L_base + λ_pair L_pair + λ_con L_con + λ_route L_route; rows (R,): the decoder's prompt
    rows (the batch's first), alpha (R, L, G), z (R, G, d)."""
    nc, nb = batch.n_concept, batch.n_base
    loss = F.mse_loss(pred[:nc], target[:nc])
    if nb:
        loss = loss + settings.lambda_base * F.mse_loss(pred[nc : nc + nb], target[nc : nc + nb])
    if len(pred) > nc + nb:
        loss = loss + settings.lambda_pair * F.mse_loss(pred[nc + nb :], target[nc + nb :])
    named = pool.named[rows]  # (R, G)
    if model.prompt_proj is not None:
        some = named.any(-1)
        loss = loss + settings.lambda_con * model.contrastive_loss(
            pool.text[rows][some], pool.pad[rows][some], z[some], named[some].bool(), settings.temperature
        )
    if settings.lambda_route:
        # Each concept's relevance (mean over layers) against whether the prompt names it; the layers are free to
        # differ. The distillation's gradient on alpha alone is weak (alpha stayed near its start without this term).
        mean = alpha.mean(1).clamp(1e-6, 1 - 1e-6)
        loss = loss + settings.lambda_route * F.binary_cross_entropy(mean, named)
    return loss
