"""Fidelity: how closely a model reproduces each expert, with no evaluator and no user images (DESIGN §4).

For concept g, on its expert's own anchors and anchor prompts, at fixed noise seeds and timesteps:

    fidelity_g = 1 − Σ_i ‖ε_model,i − ε_expert,i‖ / Σ_i ‖ε_expert,i − ε_base,i‖

both sums over the same (anchor, seed, timestep) samples i before dividing: 1 is the expert exactly, 0 is no better
than the base model (negative: worse than the base). ε_expert is the base UNet with expert g alone at full weight,
ε_base the base UNet, ε_model the model scored: a consolidated library (its relevance, gates and shared LoRA, as
Step 2 trains it) or any method's sampler (the benchmark scores every method's final model this way).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from fl2t.consolidate.common import canonical, concepts_named, prompt_states
from fl2t.consolidate.model import ConsolidatedModel
from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.models import base_config_hash
from fl2t.pipeline import ExpertPipeline
from fl2t.sampling import Sampler
from fl2t.span import SpanKV, prompt_ids

TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)  # shares of the scheduler's training timesteps
SEED = 0  # the noise of concept g's samples: the same for every version, so scores compare across versions
CHUNK = 16  # UNet rows per call

# A model scored: (prompts (B,), noisy latents (B, C, h, w), timesteps (B,)) -> its noise prediction (B, C, h, w).
Predict = Callable[[list[str], torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Target:
    """What concept g's model is compared with: the noisy anchors, and the expert's and the base's predictions."""

    prompts: list[str]
    noisy: torch.Tensor
    t: torch.Tensor
    eps_expert: torch.Tensor
    eps_base: torch.Tensor

    def score(self, predict: Predict) -> float:
        eps = predict(self.prompts, self.noisy, self.t).to(self.eps_expert)
        err = (eps - self.eps_expert).flatten(1).norm(dim=1).sum().item()
        gain = (self.eps_expert - self.eps_base).flatten(1).norm(dim=1).sum().item()
        return 1.0 - err / gain if gain > 0 else float(err == 0)


_TARGETS: dict[tuple[str, str], Target] = {}  # (base UNet, expert with its anchors) -> target, for this process
_TARGETS_KEPT = 256


@torch.no_grad()
def targets(pipe: ExpertPipeline, experts: list[Expert]) -> dict[str, Target]:
    """Each expert's target (name -> Target). `pipe`: the base model with the experts' tokens. A target depends on
    the base model and the expert alone, so it is computed once per process (a benchmark consolidates the same
    experts after every task)."""
    unet = pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = [int(f * scheduler.config.num_train_timesteps) for f in TIMESTEPS]
    base_key = _base_key(pipe)
    keys = {e.name: (base_key, _expert_key(e)) for e in experts}
    out = {e.name: _TARGETS[keys[e.name]] for e in experts if keys[e.name] in _TARGETS}
    if len(out) == len(experts):
        return out
    teacher = AggregatedLoRA(unet, stack_experts(experts, unet))
    base = _unet_predict(pipe)
    for g, expert in enumerate(experts):
        if expert.name in out:
            continue
        n = len(expert.anchor_prompts)
        gen = torch.Generator().manual_seed(SEED)
        x0 = expert.anchors.repeat(len(steps), 1, 1, 1)  # (S*N, C, h, w): every anchor at every timestep
        t = torch.tensor(steps).repeat_interleave(n)
        noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        prompts = expert.anchor_prompts * len(steps)
        one_hot = torch.zeros(CHUNK, len(teacher.stack.modules), len(experts), device=unet.device)
        one_hot[:, :, g] = 1.0
        eps_base = base(prompts, noisy, t)
        arm = functools.partial(_arm_one_hot, teacher, one_hot)
        eps_expert = _unet_predict(pipe, arm, teacher.off)(prompts, noisy, t)
        out[expert.name] = _TARGETS[keys[expert.name]] = Target(prompts, noisy, t, eps_expert, eps_base)
    teacher.remove()
    while len(_TARGETS) > _TARGETS_KEPT:
        _TARGETS.pop(next(iter(_TARGETS)))
    return out


def _base_key(pipe: ExpertPipeline) -> str:
    """The base model's architecture, a fingerprint of its weights (the UNet's first and last convolutions, the text
    encoder's first embedding rows), its device and dtype."""
    h = hashlib.sha256(base_config_hash(pipe).encode())
    embeddings = pipe.text_encoder.get_input_embeddings().weight[:64]  # base vocabulary rows
    for w in (pipe.unet.conv_in.weight, pipe.unet.conv_out.weight, embeddings):
        h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(f"{pipe.unet.device} {pipe.unet.dtype}".encode())
    return h.hexdigest()


def _expert_key(expert: Expert) -> str:
    """The expert's weights, anchors and anchor prompts, as one hash."""
    h = hashlib.sha256(expert.content_hash.encode())
    h.update(expert.anchors.float().contiguous().numpy().tobytes())
    h.update("\n".join(expert.anchor_prompts).encode())
    return h.hexdigest()


def _arm_one_hot(agg: AggregatedLoRA, one_hot: torch.Tensor, prompts: list[str]) -> None:
    agg.set(one_hot[: len(prompts)])


@torch.no_grad()
def fidelity(
    pipe: ExpertPipeline,
    experts: list[Expert],
    model: ConsolidatedModel | None,
    *,
    student: list[Expert] | None = None,
) -> dict[str, float]:
    """Fidelity per concept (name -> score) of the consolidated `model` (None: the bare base model) to `experts`, the
    set's teachers.

    `pipe` holds the experts' tokens. `student`: the experts the consolidated model mixes, when not the teachers
    themselves (same names, in any order; used to check the score sees a lost concept)."""
    experts = canonical(experts)
    goals = targets(pipe, experts)
    if model is None:
        return {name: goal.score(lambda p, x, t, g=goal: g.eps_base) for name, goal in goals.items()}
    mixed = experts if student is None else [next(s for s in student if s.name == e.name) for e in experts]
    unet = pipe.unet
    stack = stack_experts(mixed, unet)
    agg = AggregatedLoRA(unet, stack, model.shared_factors())
    span = SpanKV(unet, stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in mixed])
    model = model.to(unet.device)

    def arm(prompts: list[str]) -> None:
        _, text, pad = prompt_states(pipe, prompts)
        alpha, gamma, _ = model(text, pad, concepts_named(pipe, mixed, prompts))
        if model.config.settings.span:
            alpha = span.arm(prompt_ids(pipe.tokenizer, prompts), alpha, gamma, guided=False)
        agg.set(alpha, gamma, shared=True)

    def disarm() -> None:
        agg.off()
        span.off()

    scores = {name: goal.score(_unet_predict(pipe, arm, disarm)) for name, goal in goals.items()}
    span.remove()
    agg.remove()
    return scores


@torch.no_grad()
def sampler_fidelity(sampler: Sampler, goals: dict[str, Target]) -> dict[str, float]:
    """Fidelity per concept of what a method generates with: its sampler's UNet, armed for each batch of prompts the
    way it is when it generates (conditional prediction only). `goals`: `targets` of the concepts to score."""
    predict = _unet_predict(sampler.pipe, sampler.arm, sampler.disarm)
    return {name: goal.score(predict) for name, goal in goals.items()}


def _unet_predict(
    pipe: ExpertPipeline,
    arm: Callable[[list[str]], None] | None = None,
    disarm: Callable[[], None] | None = None,
) -> Predict:
    """ε of the pipeline's UNet on its own prompt encoding, `arm(prompts)` called for each chunk of at most CHUNK rows
    and `disarm()` after it (the per-sample hooks of a consolidated library or a method's sampler)."""
    unet = pipe.unet

    def predict(prompts: list[str], noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), CHUNK):
            chunk = prompts[i : i + CHUNK]
            states = pipe.encode_prompt(chunk, unet.device, 1, False)[0]
            if arm:
                arm(chunk)
            try:
                x = noisy[i : i + CHUNK].to(unet.device, unet.dtype)
                out.append(unet(x, t[i : i + CHUNK].to(unet.device), states).sample.float().cpu())
            finally:
                if disarm:
                    disarm()
        return torch.cat(out)

    return predict
