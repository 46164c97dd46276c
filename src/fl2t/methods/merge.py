"""`merge`: the uniform sum of the experts learned alone (task arithmetic), fused into the UNet once.

`params.scale` (default 1.0) multiplies every expert's update: ΔW = scale · Σ_g B^g A^g.
"""

from __future__ import annotations

import torch

from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.methods.base import AloneMethod, Sampler


class Merge(AloneMethod):
    name = "merge"

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        agg = AggregatedLoRA(pipe.unet, stack_experts(experts, pipe.unet))
        scale = float(self.ctx.params.get("scale", 1.0))
        agg.fuse(torch.full((len(agg.stack.modules), len(experts)), scale), None, shared=False)  # (L, G), once
        return Sampler(pipe)
