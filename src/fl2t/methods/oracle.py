"""`oracle`: each concept sampled with its own expert alone. An upper bound: at inference it is told which
concept a prompt is for, which no continual method is (`samples_per_concept`)."""

from __future__ import annotations

from fl2t.methods.base import AloneMethod
from fl2t.sampling import Sampler


class Oracle(AloneMethod):
    name = "oracle"
    samples_per_concept = True

    def sampler(self, concept: str | None = None) -> Sampler:
        if concept is None:
            raise ValueError("the oracle samples one concept at a time: name it")
        expert = self.library.expert(concept)
        pipe = self.base_pipeline()
        pipe.apply_expert(expert)
        return Sampler(pipe)
