"""`fl2t`: experts learned alone (Step 1), consolidated after every task by the set-invariant proxy module
(Step 2), sampled with the consolidated library's FL2TPipeline (DESIGN §3). Each consolidation is a library version
with each concept's fidelity, as `fl2t consolidate` makes it; the benchmark accepts it whatever the regression gate
says (the gate is for a person; the benchmark scores what the method made)."""

from __future__ import annotations

import functools

from diffusers import StableDiffusionPipeline

from fl2t.consolidate import ConsolidatedModel, set_hash
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.errors import Fl2tError
from fl2t.learning import consolidate_library
from fl2t.methods.base import AloneMethod
from fl2t.sampling import Sampler


class FL2T(AloneMethod):
    name = "fl2t"

    def consolidate(self) -> None:
        lib = self.library
        try:
            if ConsolidatedModel.load_config(lib.consolidated_dir()).set_hash == set_hash(lib.experts()):
                return  # already consolidated for this set (a resumed run)
        except Fl2tError:
            pass
        consolidate_library(lib.path, self.ctx.consolidate, base=self.ctx.base, accept=True, on_step=self.ctx.on_step)

    def sampler(self, concept: str | None = None) -> Sampler:
        """The consolidated library. For a batch of different prompts each image gets its prompt's alpha and gamma
        through the per-sample hooks (what FL2TPipeline fuses, one prompt at a time, when a user generates)."""
        pipe = FL2TPipeline.from_pretrained(self.ctx.base, library=self.library, device=self.device)
        plain_call = functools.partial(StableDiffusionPipeline.__call__, pipe)  # diffusers' own: the hooks fuse
        return Sampler(pipe, arm=pipe.arm, disarm=pipe.disarm, call=plain_call)
