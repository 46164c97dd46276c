"""`lookup`: the reference a learned Step 2 must beat. No Step 2: a prompt applies, at full weight, the expert of
every concept whose token(s) it contains (two named concepts: both experts, each at weight 1), and nothing else
(a prompt naming none: the base model). It is what a user does with a folder of LoRAs and their trigger words. On a
prompt naming one concept it is the oracle (that expert alone, with its own tokens).

`lookup+span`: the same experts at the same weights, with each one's update on the cross-attention keys and values
restricted to its own tokens (`fl2t.span`)."""

from __future__ import annotations

import torch

from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, stack_experts
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
        pipe = self.base_pipeline(experts)
        stack = stack_experts(experts, pipe.unet)
        aggregated = AggregatedLoRA(pipe.unet, stack)
        span = SpanKV(pipe.unet, stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in experts])

        def arm(prompts: list[str]) -> None:
            alpha = torch.stack([named(pipe, experts, p).expand(len(stack.modules), -1) for p in prompts])
            aggregated.set(span.arm(prompt_ids(pipe.tokenizer, prompts), alpha))

        def disarm() -> None:
            aggregated.off()
            span.off()

        return Sampler(pipe, arm=arm, disarm=disarm)


def named(pipe: ExpertPipeline, experts: list[Expert], prompt: str) -> torch.Tensor:
    """(G,): 1.0 for each expert all of whose tokens the prompt contains, else 0.0."""
    ids = set(pipe.tokenizer(prompt, truncation=True).input_ids)
    weights = [float(set(pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens)) <= ids) for e in experts]
    return torch.tensor(weights)
