"""`sequential`: one LoRA continued task after task (each task starts from the previous task's LoRA), each
concept's token learned on the way: plain sequential fine-tuning, the lower bound of continual learning and the
forgetting FL2T cures. `ewc`, `lwf`, `c-lora` and `magmax` build on it.

State: `workdir/library` holds one expert per task; for this family an expert's LoRA is the whole model's
LoRA after its task (for c-lora: that task's own LoRA), its anchors are latents the model generated right after
its task (only when a method asks for them: lwf distils on them).
"""

from __future__ import annotations

from diffusers import DDPMScheduler

from fl2t.data import Concept
from fl2t.expert import Expert
from fl2t.experts import Regulariser, learn_expert
from fl2t.methods.base import Method
from fl2t.pipeline import ExpertPipeline, diffusers_lora
from fl2t.sampling import Sampler


class Sequential(Method):
    name = "sequential"

    def learn(self, concept: Concept) -> None:
        if concept.name in self.library.names():  # learned, but the task was not recorded before a stop
            self._done(concept.name)
            return
        previous = self.experts()
        pipe = self.task_base(previous)
        init = previous[-1].lora if previous and self.continues else None
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        settings = self.ctx.learn if self.needs_anchors else self.ctx.learn.model_copy(update={"num_anchors": 0})
        reg = self.regulariser(previous, scheduler)
        expert = learn_expert(concept, pipe, settings, on_step=self.ctx.on_step, init_lora=init, regulariser=reg)
        self.after_task(expert)
        self.library.add(expert)
        self._done(concept.name)

    continues = True  # the next task starts from this LoRA (c-lora trains a fresh one per task)
    needs_anchors = False  # the model's own generations after each task (lwf distils on them)

    def task_base(self, previous: list[Expert]) -> ExpertPipeline:
        """The frozen model the task's LoRA is trained on: the base with the earlier concepts' tokens (c-lora
        fuses the earlier tasks' LoRAs into it)."""
        return self.base_pipeline(previous)

    def regulariser(self, previous: list[Expert], scheduler: DDPMScheduler) -> Regulariser | None:
        return None

    def after_task(self, expert: Expert) -> None:
        """Called with the task's expert before it is saved (ewc stores its Fisher information here)."""

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        if experts:
            pipe.load_lora_weights(diffusers_lora(experts[-1]), adapter_name="sequential")
        return Sampler(pipe)
