"""`fl2t`: experts learned alone (Step 1), consolidated after every task by the set-invariant proxy module
(Step 2), sampled with the consolidated library's FL2TPipeline (DESIGN §3). Each consolidation is a library version
with each concept's fidelity, as `fl2t consolidate` makes it; the benchmark accepts it whatever the regression gate
says (the gate is for a person; the benchmark scores what the method made).

Its one setting, `routed` (the row `fl2t+routed`), generates a prompt that selects two or more concepts routed in
space (`FL2TPipeline(routed=True)`); every other prompt as `fl2t`, image for image."""

from __future__ import annotations

import functools
from types import SimpleNamespace

from diffusers import StableDiffusionPipeline
from pydantic import Field

from fl2t.consolidate import ConsolidatedModel, set_hash
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.errors import Fl2tError
from fl2t.learning import consolidate_library
from fl2t.methods.base import AloneMethod, MethodSettings
from fl2t.sampling import Sampler


class FL2TSettings(MethodSettings):
    routed: bool = Field(
        False,
        description="generate a prompt that selects two or more concepts routed in space (each expert where its "
        "tokens' cross-attention falls, the base elsewhere; k + 2 UNet passes a step)",
    )


class FL2T(AloneMethod):
    name = "fl2t"
    settings_model = FL2TSettings

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
        routed = self.settings.routed
        pipe = FL2TPipeline.from_pretrained(self.ctx.base, library=self.library, device=self.device, routed=routed)
        plain_call = functools.partial(StableDiffusionPipeline.__call__, pipe)  # diffusers' own: the hooks fuse
        if not routed:
            return Sampler(pipe, arm=pipe.arm, disarm=pipe.disarm, call=plain_call)

        def call(prompts: list[str], generator: list, **kw: object) -> SimpleNamespace:
            """Prompts that select one concept or none through the hooks, as `fl2t`; the others routed."""
            alone = [i for i, p in enumerate(prompts) if pipe.routed_group(p) is None]
            images = {}
            if alone:
                pipe.arm([prompts[i] for i in alone])
                try:
                    out = plain_call([prompts[i] for i in alone], generator=[generator[i] for i in alone], **kw)
                finally:
                    pipe.disarm()
                images.update(zip(alone, out.images))
            for i in sorted(set(range(len(prompts))) - set(alone)):
                images[i] = pipe.generate_routed(prompts[i], generator[i], **kw)
            return SimpleNamespace(images=[images[i] for i in range(len(prompts))])

        return Sampler(pipe, call=call)
