"""`lookup`: the reference a learned Step 2 must beat. No Step 2: a prompt applies, at full weight, the expert of
every concept whose token(s) it contains (two named concepts: both experts, each at weight 1), and nothing else
(a prompt naming none: the base model). It is what a user does with a folder of LoRAs and their trigger words. On a
prompt naming one concept it is the oracle (that expert alone, with its own tokens).

`lookup+span`: the same experts at the same weights, with each one's update on the cross-attention keys and values
restricted to its own tokens (`fl2t.span`).

`lookup+routed`: on a prompt naming two or more concepts, each named expert where its own tokens' cross-attention
falls and the base model elsewhere (the routed composition teacher of `fl2t.consolidate.pairs`, used to generate);
on any other prompt, `lookup`."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fl2t.consolidate.pairs import AttentionProbe, routed_image
from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, ExpertStack, stack_experts
from fl2t.methods.base import AloneMethod, mixed_sampler
from fl2t.pipeline import ExpertPipeline
from fl2t.sampling import Sampler
from fl2t.span import SpanKV, prompt_ids


class Lookup(AloneMethod):
    name = "lookup"

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        n_layers = len(stack_experts(experts, pipe.unet).modules)
        return mixed_sampler(pipe, experts, lambda prompt: named(pipe, experts, prompt).expand(n_layers, -1))


class LookupSpan(AloneMethod):
    """`lookup` with span-restricted cross-attention keys and values: every expert the prompt names, at weight 1,
    on every adapted layer as in `lookup`, except that on attn2.to_k / attn2.to_v its update reaches only the keys
    and values of its own tokens. No Step 2.

    A reference row: it is what span restriction gives without any learning. Two named experts no longer write
    into each other's tokens (nor into the rest of the prompt) through the keys and values; their spatial updates
    (self-attention, queries, outputs) still add up everywhere. A learned Step 2, or FL2T with span restriction,
    is worth its cost only where it beats this row. On a prompt naming one concept it differs from `lookup` only
    through the keys and values of the tokens outside the concept's span."""

    name = "lookup+span"

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe, stack, aggregated, span = _armable(self, experts)

        def arm(prompts: list[str]) -> None:
            alpha = torch.stack([named(pipe, experts, p).expand(len(stack.modules), -1) for p in prompts])
            aggregated.set(span.arm(prompt_ids(pipe.tokenizer, prompts), alpha))

        def disarm() -> None:
            aggregated.off()
            span.off()

        return Sampler(pipe, arm=arm, disarm=disarm)


class LookupRouted(AloneMethod):
    """`lookup` whose experts, on a prompt naming k >= 2 concepts, are routed in space instead of summed: at every
    denoising step the conditional prediction is eps_base + sum_g M_g (eps_g - eps_base), eps_g the UNet with expert g
    alone at full weight, M_g the cross-attention mass on g's own tokens in that pass (mean over layers and heads,
    upsampled to the latent, divided by its maximum; where the masks sum above 1 they are scaled to sum to 1), and the
    unconditional prediction the base model's. It is what regional multi-concept samplers do (Mix-of-Show's regional
    sampling routes each concept's LoRA to a region the user draws; here the region is where the concept's own
    tokens attend), with no user input and no Step 2.

    A reference row for composition at generation time, not a continual method of its own: on a prompt naming one
    concept (or none) it is `lookup`, image for image. Its cost on a k-concept prompt: k + 2 UNet passes per step
    instead of 2 (CFG).

    Measured on tiny10 (v1 world, BENCHMARKS.md): its two-concept nIA is the table's highest, but its largest gain,
    stripestar + pastel, comes with routed images that lose the star (a style's tokens attend everywhere, and guidance
    against the base model's unconditional prediction amplifies the style's shift: a pastel background alone is near
    pastel's references), and the presence score finds both concepts no more often than with `lookup`. A style is not
    a region; routing suits object concepts, two of which the v1 base cannot draw. So FL2T does not route (an option
    for it was built and removed before it was measured); the row stays as the reference for world v2."""

    name = "lookup+routed"

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe, stack, agg, span = _armable(self, experts)
        probe = AttentionProbe(pipe.unet)
        n_layers = len(stack.modules)

        def call(prompts: list[str], generator: list[torch.Generator], **kw: object) -> SimpleNamespace:
            weights = [named(pipe, experts, p) for p in prompts]
            alone = [i for i, w in enumerate(weights) if w.sum() < 2]
            images: dict[int, object] = {}
            if alone:
                agg.set(torch.stack([weights[i].expand(n_layers, -1) for i in alone]))
                try:
                    out = pipe([prompts[i] for i in alone], generator=[generator[i] for i in alone], **kw).images
                finally:
                    agg.off()
                images.update(zip(alone, out))
            for i in sorted(set(range(len(prompts))) - set(alone)):
                group = tuple(weights[i].nonzero()[:, 0].tolist())
                images[i] = routed_image(pipe, agg, span, probe, prompts[i], group, generator[i], **kw)
            return SimpleNamespace(images=[images[i] for i in range(len(prompts))])

        return Sampler(pipe, call=call)


def _armable(method: AloneMethod, experts: list[Expert]) -> tuple[ExpertPipeline, ExpertStack, AggregatedLoRA, SpanKV]:
    """The base pipeline with the experts' tokens, their stack, its per-sample hooks and where each one's tokens are."""
    pipe = method.base_pipeline(experts)
    stack = stack_experts(experts, pipe.unet)
    span = SpanKV(pipe.unet, stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in experts])
    return pipe, stack, AggregatedLoRA(pipe.unet, stack), span


def named(pipe: ExpertPipeline, experts: list[Expert], prompt: str) -> torch.Tensor:
    """(G,): 1.0 for each expert all of whose tokens the prompt contains, else 0.0."""
    ids = set(pipe.tokenizer(prompt, truncation=True).input_ids)
    weights = [float(set(pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens)) <= ids) for e in experts]
    return torch.tensor(weights)
