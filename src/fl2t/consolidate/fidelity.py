"""Fidelity: how closely a consolidated model reproduces each expert, with no evaluator and no user images (DESIGN §4).

For concept g, on its expert's own anchors and anchor prompts, at fixed noise seeds and timesteps:

    fidelity_g = 1 − Σ_i ‖ε_cons,i − ε_expert,i‖ / Σ_i ‖ε_expert,i − ε_base,i‖

both sums over the same (anchor, seed, timestep) samples i before dividing: 1 is the expert exactly, 0 is no better
than the base model (negative: worse than the base). ε_cons is the consolidated model's noise prediction as Step 2
trains it (its relevance, gates and shared LoRA on the UNet), ε_expert the base UNet with expert g alone at full
weight, ε_base the base UNet.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from fl2t.consolidate.common import canonical, concepts_named, prompt_states
from fl2t.consolidate.model import ConsolidatedModel
from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.pipeline import ExpertPipeline

TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)  # shares of the scheduler's training timesteps
SEED = 0  # the noise of concept g's samples: the same for every version, so scores compare across versions
CHUNK = 16  # UNet rows per call


@torch.no_grad()
def fidelity(
    pipe: ExpertPipeline,
    experts: list[Expert],
    model: ConsolidatedModel | None,
    *,
    student: list[Expert] | None = None,
) -> dict[str, float]:
    """Fidelity per concept (name -> score) of `model` (None: the bare base model) to `experts`, the set's teachers.

    `pipe` holds the experts' tokens. `student`: the experts the consolidated model mixes, when not the teachers
    themselves (same names, in any order; used to check the score sees a lost concept)."""
    experts = canonical(experts)
    mixed = experts if student is None else [next(s for s in student if s.name == e.name) for e in experts]
    unet = pipe.unet
    device = unet.device
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = [int(f * scheduler.config.num_train_timesteps) for f in TIMESTEPS]
    scores = {}
    for g, expert in enumerate(experts):
        n = len(expert.anchor_prompts)
        gen = torch.Generator().manual_seed(SEED)
        x0 = expert.anchors.repeat(len(steps), 1, 1, 1)  # (S*N, C, h, w): every anchor at every timestep
        t = torch.tensor(steps).repeat_interleave(n)
        noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), t).to(device)
        prompts = expert.anchor_prompts * len(steps)
        states, text, pad = prompt_states(pipe, prompts)
        named = concepts_named(pipe, experts, prompts)
        t = t.to(device)

        rows = (noisy, t, states)
        eps_base = _predict(unet, rows, None)
        teacher = AggregatedLoRA(unet, stack_experts(experts, unet))
        one_hot = torch.zeros(len(prompts), len(teacher.stack.modules), len(experts), device=device)
        one_hot[:, :, g] = 1.0
        eps_expert = _predict(unet, rows, teacher, one_hot)
        teacher.remove()
        if model is None:
            eps_cons = eps_base
        else:
            agg = AggregatedLoRA(unet, stack_experts(mixed, unet), model.shared_factors())
            alpha, gamma, _ = model.to(device)(text, pad, named)
            eps_cons = _predict(unet, rows, agg, alpha, gamma)
            agg.remove()
        err = (eps_cons - eps_expert).flatten(1).norm(dim=1).sum().item()
        gain = (eps_expert - eps_base).flatten(1).norm(dim=1).sum().item()
        scores[expert.name] = 1.0 - err / gain if gain > 0 else float(err == 0)
    return scores


def _predict(
    unet: torch.nn.Module,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    agg: AggregatedLoRA | None,
    alpha: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε (B, C, h, w) for rows (noisy latents, timesteps, conditioning), with `agg` set to alpha (B, L, G) and gamma
    (B, L, G, r) (and its shared LoRA) or, without `agg`, the base UNet."""
    noisy, t, states = rows
    out = []
    for i in range(0, len(noisy), CHUNK):
        if agg is not None:
            agg.set(alpha[i : i + CHUNK], None if gamma is None else gamma[i : i + CHUNK], shared=True)
        out.append(unet(noisy[i : i + CHUNK], t[i : i + CHUNK], states[i : i + CHUNK]).sample.float())
    if agg is not None:
        agg.off()
    return torch.cat(out)
