"""`magmax` (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024), and
`magmax-alone`, the variant of Staniszewski et al. ("Low-Rank Continual Personalization of Diffusion Models", 2024).

`magmax`, what it does. MagMax is sequential fine-tuning followed by a max-magnitude merge of its task vectors.
One LoRA is continued task after task (as `sequential`: task t starts from task t−1's LoRA, no regulariser);
after task t the model is `θ_t = W_0 + B_t A_t`, so its task vector is `τ_t = θ_t − θ_0 = B_t A_t`, the dense
update of the sequential LoRA after task t, which the library keeps per task. The model that samples is
`W_0 + scale · MaxMag(τ_1 … τ_t)`: per entry of each adapted weight, the τ of largest magnitude (its sign
kept), with every concept's token. `scale` is MagMax's scaling coefficient λ (default 1).

Where it departs, and why: MagMax merges full-model task vectors of a fine-tuned network; here the fine-tuning
is the LoRA (the same Step-1 budget and placement as every method), so the task vectors are its dense updates
and the rest of the UNet is the frozen base. The concept tokens are learned with their task and all kept (a text
encoder fine-tuned in full would be merged too). Cost: the sequential LoRA's; the merge is one pass over the
adapted weights at sampling time.

`magmax-alone`, Staniszewski et al.'s variant: each concept's LoRA learned alone from the base (the shared store
of experts), merged per entry by largest magnitude and added once (`scale`, tuned like magmax's). Kept as its
own row because it does not learn sequentially: its merge takes independent experts, not a continued model's task
vectors.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fl2t.expert import Expert
from fl2t.methods.base import AloneMethod, MethodSettings, dense_update
from fl2t.methods.sequential import Sequential
from fl2t.pipeline import ExpertPipeline
from fl2t.sampling import Sampler


class MagMaxSettings(MethodSettings):
    scale: float = Field(1.0, gt=0, description="MagMax's scaling coefficient of the merged task vector")


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


def magmax_pipeline(pipe: ExpertPipeline, experts: list[Expert], scale: float) -> ExpertPipeline:
    """`pipe` with `scale` times the per-entry max-magnitude merge of the experts' updates added to its UNet."""
    with torch.no_grad():
        for m in sorted({m for e in experts for m in e.modules}):
            lin = pipe.unet.get_submodule(m)
            lin.weight += scale * magmax_update(experts, m).to(lin.weight)
    return pipe


class MagMax(Sequential):
    """Sequential fine-tuning of one LoRA; samples with the max-magnitude merge of its per-task task vectors."""

    name = "magmax"
    settings_model = MagMaxSettings
    settings: MagMaxSettings

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()  # expert t's LoRA: the sequential LoRA after task t, so its B A is τ_t
        return Sampler(magmax_pipeline(self.base_pipeline(experts), experts, self.settings.scale))


class MagMaxAlone(AloneMethod):
    """Staniszewski et al. 2024's variant: the max-magnitude merge of the experts learned alone."""

    name = "magmax-alone"
    settings_model = MagMaxSettings  # its scale is tuned as merge's and magmax's are
    settings: MagMaxSettings

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        return Sampler(magmax_pipeline(self.base_pipeline(experts), experts, self.settings.scale))
