"""`lookup`: the reference a learned Step 2 must beat. No Step 2: a prompt applies, at full weight, the expert of
every concept whose token(s) it contains (two named concepts: both experts, each at weight 1), and nothing else
(a prompt naming none: the base model). It is what a user does with a folder of LoRAs and their trigger words. On a
prompt naming one concept it is the oracle (that expert alone, with its own tokens)."""

from __future__ import annotations

import torch

from fl2t.expert import Expert
from fl2t.fusion import stack_experts
from fl2t.methods.base import AloneMethod, mixed_sampler
from fl2t.pipeline import ExpertPipeline
from fl2t.sampling import Sampler


class Lookup(AloneMethod):
    name = "lookup"

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        n_layers = len(stack_experts(experts, pipe.unet).modules)
        return mixed_sampler(pipe, experts, lambda prompt: named(pipe, experts, prompt).expand(n_layers, -1))


def named(pipe: ExpertPipeline, experts: list[Expert], prompt: str) -> torch.Tensor:
    """(G,): 1.0 for each expert all of whose tokens the prompt contains, else 0.0."""
    ids = set(pipe.tokenizer(prompt, truncation=True).input_ids)
    weights = [float(set(pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens)) <= ids) for e in experts]
    return torch.tensor(weights)
