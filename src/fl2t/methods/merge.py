"""`merge`: the uniform sum of the experts learned alone (task arithmetic), fused into the UNet once.

`MergeSettings.scale` (default 1.0) multiplies every expert's update: ΔW = scale · Σ_g B^g A^g.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.methods.base import AloneMethod, MethodSettings
from fl2t.sampling import Sampler


class MergeSettings(MethodSettings):
    scale: float = Field(1.0, description="multiplies every expert's update")


class Merge(AloneMethod):
    name = "merge"
    settings_model = MergeSettings
    settings: MergeSettings

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        agg = AggregatedLoRA(pipe.unet, stack_experts(experts, pipe.unet))
        weights = torch.full((len(agg.stack.modules), len(experts)), self.settings.scale)  # (L, G)
        agg.fuse(weights, None, shared=False)  # once
        return Sampler(pipe)
