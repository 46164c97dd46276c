"""`merge`: the uniform sum of the experts learned alone (task arithmetic), fused into the UNet once.

`params.scale` (default 1.0) multiplies every expert's update: ΔW = scale · Σ_g B^g A^g.
"""

from __future__ import annotations

import torch

from fl2t.fusion import stack_experts
from fl2t.methods.base import AloneMethod, Sampler, fused_sampler


class Merge(AloneMethod):
    name = "merge"

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        n_layers = len(stack_experts(experts, pipe.unet).modules)
        w = torch.full((n_layers, len(experts)), float(self.ctx.params.get("scale", 1.0)))  # (L, G)
        return fused_sampler(pipe, experts, lambda prompt: w)
