"""`cidm` (Dong et al., NeurIPS 2024), as its public release does it (../shared/PRIOR_ART.md):

- Step 1: every task trains a fresh LoRA from the frozen base, with a consolidation loss against the earlier
  tasks' LoRAs: for each earlier task and each layer, `mean |B_new B_oldᵀ|` on the up-weights B (out × r),
  averaged and weighted `CIDMSettings.cidm_lambda` (0.1). (The release also adds `MSE(B_new, 1)`, undocumented;
  left out: it pulls a LoRA's up-weights to one regardless of the data.)
- Inference, elastic weight aggregation (EWA): reference vectors are the text encoder's states of the
  concatenation of every concept's tokens; each reference token's cosine to each prompt token, max over the
  prompt, mean over each concept's token span, to the 4th power, L1-normalised over concepts → w_g; the
  update is `Σ_g w_g · 0.8 · B^g A^g`, applied per image by hooks (as the release does, every step). With layer-wise
  embeddings the release computes w per cross-attention layer; here one w serves every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from fl2t.data import Concept
from fl2t.expert import Expert
from fl2t.experts import ExpertModel, Regulariser, learn_expert
from fl2t.fusion import stack_experts
from fl2t.methods.base import Method, MethodSettings, Tokenize, lora_layers, mixed_sampler
from fl2t.pipeline import ExpertPipeline
from fl2t.sampling import Sampler

EWA_SCALE = 0.8


class CIDMSettings(MethodSettings):
    cidm_lambda: float = Field(0.1, ge=0, description="weight of the consolidation loss against earlier LoRAs")


class _Orthogonal(Regulariser):
    def __init__(self, previous: list[Expert], lam: float) -> None:
        self.lam = lam
        self.old: dict[str, list[torch.Tensor]] = {}  # module -> earlier tasks' up-weights, each (out, r)
        for e in previous:
            for m in e.modules:
                self.old.setdefault(m, []).append(e.lora[f"{m}.lora_B.weight"])

    def start(self, model: ExpertModel, tokenize: Tokenize) -> None:
        self.layers = lora_layers(model.unet)
        # on the LoRA's device and dtype once, not at every step
        self.old = {m: [b.to(self.layers[m][1]) for b in bs] for m, bs in self.old.items() if m in self.layers}

    def loss(self, model: ExpertModel, tokenize: Tokenize, gen: torch.Generator) -> torch.Tensor:
        terms = [(b @ old.T).abs().mean() for m, (_, b) in self.layers.items() for old in self.old.get(m, [])]
        return self.lam * torch.stack(terms).mean() if terms else torch.zeros(())


class CIDM(Method):
    name = "cidm"
    settings_model = CIDMSettings
    settings: CIDMSettings

    def learn(self, concept: Concept) -> None:
        if concept.name not in self.library.names():
            previous = self.experts()
            reg = _Orthogonal(previous, self.settings.cidm_lambda) if previous else None
            expert = learn_expert(concept, self.fresh_base(), self.ctx.learn, on_step=self.ctx.on_step, regulariser=reg)
            self.library.add(expert)
        self._done(concept.name)

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        n_layers = len(stack_experts(experts, pipe.unet).modules)
        ewa = ElasticWeights(pipe, experts)
        return mixed_sampler(
            pipe,
            experts,
            lambda prompt: (EWA_SCALE * ewa(prompt)).expand(n_layers, -1),  # (L, G)
        )


class ElasticWeights:
    """CIDM's EWA weights w (G,) of a prompt over the experts (they sum to 1)."""

    def __init__(self, pipe: ExpertPipeline, experts: list[Expert]) -> None:
        self.pipe = pipe
        spans = [list(e.spec.tokens) for e in experts]
        self.refs = self._states(" ".join(t for span in spans for t in span))  # (n_tokens, D)
        self.bounds = torch.tensor([0] + [len(s) for s in spans]).cumsum(0).tolist()

    def __call__(self, prompt: str) -> torch.Tensor:
        sims = self.refs @ self._states(prompt).T  # (reference tokens, prompt tokens)
        best = sims.max(dim=1).values.clamp(min=0)  # (reference tokens,)
        b = self.bounds
        s = torch.stack([best[b[g] : b[g + 1]].mean() for g in range(len(b) - 1)]) ** 4  # (G,)
        return s / s.sum().clamp(min=1e-12)

    @torch.no_grad()
    def _states(self, text: str) -> torch.Tensor:
        """Unit-norm final text-encoder states of the text's own tokens (no start, end or padding), (n, D)."""
        pipe = self.pipe
        ids = pipe.tokenizer(text, truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
        return F.normalize(pipe.text_encoder(ids)[0][0, 1:-1].float(), dim=-1)
