"""`magmax` (Staniszewski et al., "Low-Rank Continual Personalization of Diffusion Models", 2024): per weight
entry, keep the task update of largest magnitude among the experts' dense ΔW, added to the UNet once."""

from __future__ import annotations

import torch

from fl2t.data import Concept
from fl2t.methods.base import Method, Sampler, dense_update


class MagMax(Method):
    name = "magmax"
    uses_store = True

    def learn(self, concept: Concept) -> None:
        expert = self.store_expert(concept)
        if concept.name not in self.library.names():
            self.library.add(expert)
        self._done(concept.name)

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        modules = sorted({m for e in experts for m in e.modules})
        with torch.no_grad():
            for m in modules:
                best: torch.Tensor | None = None  # running entry-wise max-magnitude update (out, in)
                for e in experts:
                    d = dense_update(e, m)
                    if d is None:
                        continue
                    best = d if best is None else torch.where(d.abs() > best.abs(), d, best)
                lin = pipe.unet.get_submodule(m)
                lin.weight += best.to(lin.weight)
        return Sampler(pipe)
