"""`fl2t`: experts learned alone (Step 1), consolidated after every task by the set-invariant proxy module
(Step 2), sampled with the consolidated library's FL2TPipeline (DESIGN §3)."""

from __future__ import annotations

from fl2t.consolidate import consolidate, save_consolidated
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.consolidate.train import canonical, set_hash
from fl2t.errors import Fl2tError
from fl2t.methods.base import AloneMethod, Sampler


class FL2T(AloneMethod):
    name = "fl2t"

    def consolidate(self) -> None:
        lib = self.library
        try:
            _, record = lib.consolidated()
            if record.get("set_hash") == set_hash(canonical(lib.experts())):
                return  # already consolidated for this set (a resumed run)
        except Fl2tError:
            pass
        save_consolidated(lib, *consolidate(lib, self.ctx.consolidate, base=self.ctx.base, on_step=self.ctx.on_step))

    def sampler(self, concept: str | None = None) -> Sampler:
        return Sampler(FL2TPipeline.from_pretrained(self.ctx.base, library=self.library))
