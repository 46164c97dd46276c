"""Two concepts in one prompt: which pairs Step 2 trains, their prompts, and the composition teacher (DESIGN §3).

Two composition teachers (`pair_teacher`):
  span    the base UNet with both experts at full weight, each expert's update on the cross-attention keys and values
          restricted to its own tokens (`fl2t.span`: exact, since a text token's key and value depend on that token
          alone), the other adapted layers carrying both updates;
  routed  each expert's prediction (alone, at full weight) where its own tokens' cross-attention falls, the base
          model's elsewhere: eps_base + sum_g M_g (eps_g - eps_base), M_g the attention mass on g's tokens in g's own
          pass (mean over cross-attention layers and heads, upsampled to the latent, divided by its maximum; where
          M_a + M_b > 1 both scaled to sum to 1), as regional multi-concept samplers route experts.
The teacher's latents for a pair (the pair anchors) are generated once and kept beside the consolidated model, as each
expert keeps its own anchors.

Which pairs are trained, their prompts and their anchors' seeds derive from the two experts' content hashes alone:
adding a concept adds pairs and may displace a pair of a concept with more partners than `pairs_per_concept`, but
never reshuffles the others; with a stochastic scheduler the anchors' step noise comes from the pair's own generator.
So the library is byte-identical whatever the arrival order, pair training on or off (tests/test_consolidate.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from fl2t.config import ConsolidateSettings
from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.pipeline import ExpertPipeline
from fl2t.span import SpanKV, prompt_ids
from fl2t.text import LayerwiseCrossAttnProcessor

# Per kind of pair, object first ({} are the subjects); a pair of two styles is not trained.
PAIR_TEMPLATES = {
    "object+object": ["a photo of a {} and a {}", "a {} and a {}", "a rendering of a {} next to a {}"],
    "object+style": [
        "a {} in the style of {}",
        "a photo of a {} in the style of {}",
        "a rendering of a {} in the style of {}",
    ],
}


@dataclass(frozen=True)
class Pair:
    """Two experts of the set (indices in canonical order, object first) and their prompts."""

    first: int
    second: int
    key: str  # sha256 of the two content hashes and the anchor settings: the pair anchors' cache key
    prompts: tuple[str, ...]  # one per pair anchor
    seed: int  # of the pair anchors' noise


def _pair_hash(a: Expert, b: Expert) -> str:
    return hashlib.sha256("".join(sorted((a.content_hash, b.content_hash))).encode()).hexdigest()


def trained_pairs(experts: list[Expert], settings: ConsolidateSettings) -> list[Pair]:
    """For each concept, its `pairs_per_concept` partners of lowest pair hash; the union, by pair hash."""
    chosen: dict[str, tuple[int, int]] = {}
    for g, e in enumerate(experts):
        partners = sorted(
            (_pair_hash(e, f), k) for k, f in enumerate(experts) if k != g and "object" in (e.spec.kind, f.spec.kind)
        )
        for h, k in partners[: settings.pairs_per_concept]:
            chosen[h] = (g, k)
    pairs = []
    for h in sorted(chosen):
        g, k = sorted(chosen[h], key=lambda i: (experts[i].spec.kind != "object", experts[i].content_hash))
        a, b = experts[g], experts[k]
        templates = PAIR_TEMPLATES[f"{a.spec.kind}+{b.spec.kind}"]
        prompts = tuple(
            templates[i % len(templates)].format(a.spec.subject, b.spec.subject) for i in range(settings.pair_anchors)
        )
        what = [
            h,
            settings.pair_teacher,
            settings.pair_anchors,
            settings.pair_anchor_steps,
            settings.pair_anchor_guidance,
            prompts,
        ]
        key = hashlib.sha256(json.dumps(what).encode()).hexdigest()
        pairs.append(Pair(g, k, key, prompts, int(h[:15], 16)))
    return pairs


class CompositionTeacher:
    """Arms `agg` and `span` so that the UNet predicts as each row's teacher: expert g alone (at full weight, on every
    token) for a row naming concept g, the base model for a row naming none, and for a pair row both experts at full
    weight with their key/value updates restricted to their own tokens."""

    def __init__(self, agg: AggregatedLoRA, span: SpanKV) -> None:
        self.agg, self.span = agg, span

    def arm(self, input_ids: torch.Tensor, named: torch.Tensor, pair_rows: torch.Tensor, guided: bool = False) -> None:
        """input_ids (B, T); named (B, G): 1 for each concept a row names; pair_rows (B,) bool."""
        L = len(self.agg.stack.modules)
        alpha = named.float()[:, None, :].expand(-1, L, -1).to(self.agg.device)
        where = named.bool() & pair_rows.to(named.device).bool()[:, None]
        self.agg.set(self.span.arm(input_ids, alpha, guided=guided, where=where))

    def off(self) -> None:
        self.agg.off()
        self.span.off()


class AttentionProbe:
    """While `recording()`, the UNet's cross-attention layers compute attention explicitly and keep each layer's
    probabilities, mean over heads (the adapted layers' hooks still apply: to_q, to_k, to_v are called as modules)."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.maps: list[torch.Tensor] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        saved = self.unet.attn_processors
        self.unet.set_attn_processor({k: self._recorder(v) if ".attn2." in k else v for k, v in saved.items()})
        try:
            yield
        finally:
            self.unet.set_attn_processor(saved)

    def _recorder(self, saved: object) -> Callable[..., torch.Tensor]:
        """The recording processor of a layer whose processor was `saved`: a layer-wise one reads its own slice of
        the text states (`fl2t.text.LayerwiseCrossAttnProcessor`), as it would."""
        layerwise = saved if isinstance(saved, LayerwiseCrossAttnProcessor) else None

        def record(
            attn: Attention,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            *args: object,
            **kw: object,
        ) -> torch.Tensor:
            if layerwise is not None:
                encoder_hidden_states = encoder_hidden_states.chunk(layerwise.n_layers, dim=1)[layerwise.index]
            return self._record(attn, hidden_states, encoder_hidden_states)

        return record

    def _record(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (B*heads, N, T)
        self.maps.append(probs.view(b, -1, *probs.shape[1:]).mean(1))  # (B, N, T)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))

    def mass(self, span: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, 1, h, w): the recorded attention mass on the tokens `span` (B, T) marks, mean over layers, divided by
        its maximum; clears the record."""
        out = []
        for m in self.maps:
            side = int(round(m.shape[1] ** 0.5))
            a = (m * span[:, None, :].to(m.dtype)).sum(-1).view(-1, 1, side, m.shape[1] // side)
            out.append(F.interpolate(a, size=size, mode="bilinear", align_corners=False))
        self.maps.clear()
        mass = torch.stack(out).mean(0)
        return mass / mass.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-8)


@torch.no_grad()
def routed_prediction(
    unet: nn.Module,
    agg: AggregatedLoRA,
    probe: AttentionProbe,
    x: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    spans: torch.Tensor,
    pairs: list[tuple[int, ...]],
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed teacher's prediction for rows x (B, C, h, w) naming the pairs (expert indices of `agg`'s stack;
    any number of experts per row, the same for every row), spans (B, G, T): where each expert's tokens are.
    alpha (B, L, G): each expert's weight per layer in its own pass (None: 1 on every layer)."""
    base = unet(x, t, states).sample
    L, G = len(agg.stack.modules), agg.stack.n_experts
    rows = torch.arange(len(pairs))
    masks, preds = [], []
    for j in range(len(pairs[0])):
        g = torch.tensor([p[j] for p in pairs])
        one = torch.zeros(len(pairs), L, G, device=x.device)
        one[rows, :, g] = 1.0 if alpha is None else alpha[rows, :, g].to(x.device)
        agg.set(one)
        try:
            with probe.recording():
                preds.append(unet(x, t, states).sample)
        finally:
            agg.off()
        masks.append(probe.mass(spans[rows, g].to(x.device), tuple(x.shape[-2:])))
    total = sum(masks).clamp(min=1.0)
    return base + sum(m / total * (p - base) for m, p in zip(masks, preds))


@torch.no_grad()
def routed_image(
    pipe: ExpertPipeline,
    agg: AggregatedLoRA,
    span: SpanKV,
    probe: AttentionProbe,
    prompt: str,
    group: tuple[int, ...],
    generator: torch.Generator | None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    alpha: torch.Tensor | None = None,
    output_type: str = "pil",
    callback_on_step_end: Callable[..., object] | None = None,
) -> object:
    """One image of a prompt naming the experts `group` (indices of `agg`'s stack), routed in space: at every step the
    conditional prediction is `routed_prediction` (each expert alone where its own tokens' cross-attention falls, the
    base model elsewhere), the unconditional one the base model's, with classifier-free guidance. The latents are drawn
    from the generator as diffusers' pipeline draws one image's. alpha (L, G): each expert's weight per layer in its
    own pass (None: 1). `callback_on_step_end(pipe, i, t, {})` after each step, as diffusers calls it (progress).
    Costs len(group) + 2 UNet passes per step."""
    unet, sched, device = pipe.unet, pipe.scheduler, pipe.device
    size = unet.config.sample_size * pipe.vae_scale_factor
    h, w = (height or size) // pipe.vae_scale_factor, (width or size) // pipe.vae_scale_factor
    cond, uncond = pipe.encode_prompt(prompt, device, 1, True, "")[:2]
    spans = span.spans(prompt_ids(pipe.tokenizer, [prompt]))
    x = randn_tensor((1, unet.config.in_channels, h, w), generator=generator, device=device, dtype=cond.dtype)
    x = x * sched.init_noise_sigma
    sched.set_timesteps(num_inference_steps, device=device)
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    weights = None if alpha is None else alpha[None]
    for i, t in enumerate(sched.timesteps):
        xi = sched.scale_model_input(x, t)
        eu = unet(xi, t, uncond).sample
        ec = routed_prediction(unet, agg, probe, xi, t, cond, spans, [group], weights)
        x = sched.step(eu + guidance_scale * (ec - eu), t, x, **extra).prev_sample
        if callback_on_step_end is not None:
            callback_on_step_end(pipe, i, t, {})
    if output_type == "latent":
        return x[0]
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type=output_type)[0]


@torch.no_grad()
def pair_anchors(
    pipe: ExpertPipeline, experts: tuple[Expert, Expert], pair: Pair, size: int, settings: ConsolidateSettings
) -> torch.Tensor:
    """(N, C, h, w): the latents the composition teacher of the two experts generates for the pair's prompts, seeded
    from the pair, with classifier-free guidance. Made with the pair's own two experts only, so the bytes do not
    depend on the rest of the set."""
    unet, sched = pipe.unet, pipe.scheduler
    stack = stack_experts(list(experts), unet)
    agg = AggregatedLoRA(unet, stack)
    span = SpanKV(unet, stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in experts])
    teacher, probe = CompositionTeacher(agg, span), AttentionProbe(unet)
    device, h = unet.device, size // pipe.vae_scale_factor
    uncond = pipe.encode_prompt("", device, 1, False)[0]
    # A stochastic scheduler (DDPM, Euler ancestral) draws noise in each step: from the pair's generator, never the
    # global one, whose state depends on what ran before (it made the anchors differ across arrival orders).
    stochastic = "generator" in inspect.signature(sched.step).parameters
    latents = []
    try:
        for i, prompt in enumerate(pair.prompts):
            ids = prompt_ids(pipe.tokenizer, [prompt])
            cond = pipe.encode_prompt(prompt, device, 1, False)[0]
            gen = torch.Generator().manual_seed((pair.seed + i) % 2**63)
            x = torch.randn((1, unet.config.in_channels, h, h), generator=gen).to(device) * sched.init_noise_sigma
            noise = {"generator": gen} if stochastic else {}
            sched.set_timesteps(settings.pair_anchor_steps, device=device)
            for t in sched.timesteps:
                xi = sched.scale_model_input(x, t)
                if settings.pair_teacher == "routed":
                    eu = unet(xi, t, uncond).sample
                    ec = routed_prediction(unet, agg, probe, xi, t, cond, span.spans(ids), [(0, 1)])
                else:
                    teacher.arm(ids, torch.ones(1, 2), torch.ones(1, dtype=torch.bool), guided=True)
                    try:
                        eu, ec = unet(torch.cat([xi, xi]), t, torch.cat([uncond, cond])).sample.chunk(2)
                    finally:
                        teacher.off()
                x = sched.step(eu + settings.pair_anchor_guidance * (ec - eu), t, x, **noise).prev_sample
            latents.append(x.float().cpu())
    finally:
        agg.remove()
        span.remove()
    return torch.cat(latents)
