"""Step 2 training: consolidate a library's experts into proxies + decoder + heads, without replay.

One loop, top to bottom. Each expert teaches its own concept on its cached synthetic anchors (L_distill); prompts
that name no concept must keep the base model's prediction (L_base); the decoded proxies are tied to the
concepts a prompt names by InfoNCE (L_con); two-concept prompts take part through L_con only.
Order-agnostic: experts are sorted by content hash before any random draw, and the seed comes from the set.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from fl2t.config import ConsolidateSettings
from fl2t.consolidate.model import ConsolidatedModel
from fl2t.data import OBJECT_TEMPLATES
from fl2t.errors import Fl2tError
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.expert import Expert
from fl2t.library import Library
from fl2t.pipeline import ExpertPipeline


def canonical(experts: list[Expert]) -> list[Expert]:
    """The set's canonical order: by content hash, independent of arrival order."""
    return sorted(experts, key=lambda e: e.content_hash)


def set_hash(experts: list[Expert]) -> str:
    return hashlib.sha256("".join(sorted(e.content_hash for e in experts)).encode()).hexdigest()


def prompt_states(pipe: ExpertPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet conditioning (P, T or L*T, D), decoder input (P, T, D) and its padding mask (P, T), frozen encoder."""
    device = pipe.unet.device
    with torch.no_grad():  # in chunks: the pool grows with G
        unet_states = torch.cat([pipe.encode_prompt(prompts[i : i + 256], device, 1, False)[0] for i in range(0, len(prompts), 256)])
    T = pipe.tokenizer.model_max_length
    text = unet_states.view(len(prompts), -1, T, unet_states.shape[-1]).mean(1)  # layer-wise: mean over layers
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=T, truncation=True, return_tensors="pt").input_ids
    eos = (ids == pipe.tokenizer.eos_token_id).int().argmax(-1, keepdim=True)  # first end-of-text token
    pad = torch.arange(T).unsqueeze(0) > eos
    return unet_states, text, pad.to(device)


def concepts_named(pipe: ExpertPipeline, experts: list[Expert], prompts: list[str]) -> torch.Tensor:
    """(P, G): the share of expert g's tokens that prompt p contains (1.0 when the prompt names the concept)."""
    T = pipe.tokenizer.model_max_length
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=T, truncation=True, return_tensors="pt").input_ids
    out = torch.zeros(len(prompts), len(experts))
    for g, e in enumerate(experts):
        for tid in pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens):
            out[:, g] += (ids == tid).any(-1).float() / len(e.spec.tokens)
    return out.to(pipe.unet.device)


def build_pipeline(lib: Library, experts: list[Expert], base: str | None) -> ExpertPipeline:
    pipe, _ = ExpertPipeline.for_library(lib, base)
    for e in experts:
        pipe.add_expert_tokens(e)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
    return pipe


def new_model(pipe: ExpertPipeline, experts: list[Expert], settings: ConsolidateSettings) -> tuple[ConsolidatedModel, AggregatedLoRA]:
    stack = stack_experts(experts, pipe.unet)
    shapes = {m: (pipe.unet.get_submodule(m).in_features, pipe.unet.get_submodule(m).out_features) for m in stack.modules}
    proxies = torch.stack([e.stable_embedding for e in experts])  # (G, d), P_g initialised from C_g
    model = ConsolidatedModel(proxies, shapes, stack.rank, settings).to(pipe.unet.device)
    return model, AggregatedLoRA(pipe.unet, stack, model.shared_factors())


def consolidate(lib: Library, settings: ConsolidateSettings, *, base: str | None = None, on_step: Callable[[int, float], None] | None = None):
    """Train the consolidated model for the library's current set of experts; returns (model, record)."""
    experts = canonical(lib.experts())
    if not experts:
        raise Fl2tError(f"library {lib.path}: has no concepts to consolidate; learn one first")
    if any(e.anchors.numel() == 0 for e in experts):
        bad = next(e.name for e in experts if e.anchors.numel() == 0)
        raise Fl2tError(f"concept {bad!r} has no synthetic anchors (learned with num_anchors 0); relearn it with --replace")
    h = set_hash(experts)
    seed = (int(h[:15], 16) + settings.seed) % 2**63
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    pipe = build_pipeline(lib, experts, base)
    device = pipe.unet.device
    model, agg = new_model(pipe, experts, settings)
    G = len(experts)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # Prompt pools. Concept items: (prompt, anchor latent, the concept). Base items name no concept.
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
    anchors = torch.stack([x for _, x, _ in concept_items]).to(device)  # (Nc, C, h, w)
    Nc, Nb = len(concept_items), len(base_prompts)
    concept_of = torch.tensor([g for _, _, g in concept_items])

    n_base = round(settings.batch_size * settings.base_share) if Nb else 0
    n_multi = round(settings.batch_size * settings.multi_share) if pairs else 0
    n_concept = max(1, settings.batch_size - n_base - n_multi)
    token_share = concepts_named(pipe, experts, prompts)
    model.init_routing(settings.route_margin)
    scalars = [model.match_scale, model.none_logit]  # the routing's scale and threshold learn faster than the weights
    rest = [p for p in model.parameters() if all(p is not q for q in scalars)]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": scalars, "lr": 10 * settings.lr}], lr=settings.lr, weight_decay=0.0)
    L = len(agg.stack.modules)

    for step in range(settings.steps):
        ci = torch.randint(Nc, (n_concept,), generator=gen)
        bi = torch.randint(Nb, (n_base,), generator=gen) if n_base else torch.zeros(0, dtype=torch.long)
        mi = torch.randint(len(pairs), (n_multi,), generator=gen) if n_multi else torch.zeros(0, dtype=torch.long)
        rows = torch.cat([ci, Nc + bi, Nc + Nb + mi])  # prompt indices; the first n_concept + n_base go to the UNet
        x0 = anchors[torch.cat([ci, torch.randint(Nc, (n_base,), generator=gen)])]  # base prompts on any anchor
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        n_unet = len(x0)
        states = unet_states[rows[:n_unet]]

        with torch.no_grad():  # teachers: expert g alone for its concept's prompts, the base model for the rest
            teach = torch.zeros(n_unet, L, G, device=device)
            teach[torch.arange(n_concept), :, concept_of[ci]] = 1.0
            agg.set(teach)
            target = pipe.unet(noisy, t, states).sample

        alpha, gamma, z = model(text[rows], pad[rows], token_share[rows])
        agg.set(alpha[:n_unet], None if gamma is None else gamma[:n_unet], shared=True)
        pred = pipe.unet(noisy, t, states).sample
        agg.off()
        loss = F.mse_loss(pred[:n_concept], target[:n_concept])
        if n_base:
            loss = loss + settings.lambda_base * F.mse_loss(pred[n_concept:], target[n_concept:])
        if model.prompt_proj is not None:
            positives = torch.zeros(len(rows), G, dtype=torch.bool, device=device)
            positives[torch.arange(n_concept), concept_of[ci]] = True
            for j, m in enumerate(mi.tolist()):
                positives[n_unet + j, list(pairs[m])] = True
            named = positives.any(-1)
            loss = loss + settings.lambda_con * model.contrastive_loss(text[rows][named], pad[rows][named], z[named], positives[named], settings.temperature)
        if settings.lambda_route:
            # Routing: the prompts' relevance (mean over layers, "none" last) should pick the concepts they name.
            # The distillation's gradient on alpha alone is weak (alpha stayed near uniform without this term).
            route = torch.zeros(len(rows), G + 1, device=device)
            route[torch.arange(n_concept), concept_of[ci]] = 1.0
            route[n_concept : n_concept + n_base, G] = 1.0
            for j, m in enumerate(mi.tolist()):
                route[n_unet + j, list(pairs[m])] = 0.5
            probs = torch.cat([alpha, (1 - alpha.sum(-1, keepdim=True)).clamp(min=0)], dim=-1).mean(1)  # (B, G+1)
            loss = loss + settings.lambda_route * -(route * probs.clamp(min=1e-8).log()).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.item())

    agg.remove()
    record = {
        "set_hash": h,
        "experts": [{"name": e.name, "content_hash": e.content_hash} for e in experts],
        "modules": agg.stack.modules,
        "rank": agg.stack.rank,
        "settings": settings.model_dump(),
    }
    return model, record


def save_consolidated(lib: Library, model: ConsolidatedModel, record: dict) -> str:
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    return lib.save_consolidated(tensors, record)


def load_consolidated(lib: Library, experts: list[Expert], pipe: ExpertPipeline) -> tuple[ConsolidatedModel, AggregatedLoRA]:
    """The library's consolidated model for exactly these experts (canonical order), hooked into `pipe`'s UNet."""
    tensors, record = lib.consolidated()
    if record["set_hash"] != set_hash(experts):
        raise Fl2tError(f"library {lib.path}: the consolidated model is for another set of concepts; run `fl2t consolidate --library {lib.path}`")
    settings = ConsolidateSettings(**record["settings"])
    model, agg = new_model(pipe, experts, settings)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise Fl2tError(
            f"library {lib.path}: consolidated weights do not fit this version of fl2t ({str(e).splitlines()[0]}); "
            f"run `fl2t consolidate --library {lib.path}`"
        ) from None
    model.eval()
    return model, agg
