"""`magmax` (Staniszewski et al., "Low-Rank Continual Personalization of Diffusion Models", 2024): per weight
entry, keep the task update of largest magnitude among the experts' dense ΔW, added to the UNet once."""

from __future__ import annotations

import torch

from fl2t.expert import Expert
from fl2t.methods.base import AloneMethod, dense_update
from fl2t.sampling import Sampler


class MagMax(AloneMethod):
    name = "magmax"

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        modules = sorted({m for e in experts for m in e.modules})
        with torch.no_grad():
            for m in modules:
                lin = pipe.unet.get_submodule(m)
                lin.weight += magmax_update(experts, m).to(lin.weight)
        return Sampler(pipe)


def magmax_update(experts: list[Expert], module: str) -> torch.Tensor:
    """Per entry of the module's weight, the experts' dense update ΔW = B A of largest magnitude (out, in);
    one dense update is held at a time."""
    best: torch.Tensor | None = None
    for e in experts:
        d = dense_update(e, module)
        if d is not None:
            best = d if best is None else torch.where(d.abs() > best.abs(), d, best)
    assert best is not None, f"no expert adapts {module}"
    return best
