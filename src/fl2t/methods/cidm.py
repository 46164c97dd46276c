"""`cidm` (Dong et al., NeurIPS 2024) as its public release does it (../shared/PRIOR_ART.md), and `cidm+tokens`,
the same method routed by the prompt's concept tokens.

Follows the release:
- Step 1: every task trains a fresh LoRA from the frozen base on the benchmark's budget (`ctx.learn`: the same
  steps, rank, learning rates and images as every method) with two settings of the paper: LoRA on
  cross-attention only (`lora_attention="cross"`, attn2's to_q/to_k/to_v/to_out.0) and ED-LoRA layer-wise token
  embeddings (`layerwise=True`, one embedding per cross-attention layer). From task 2 on, a consolidation loss
  against the earlier tasks' LoRAs: for each earlier task and each layer, `mean |B_new B_oldᵀ|` on the
  up-weights B (out × r), averaged and weighted `CIDMSettings.cidm_lambda` (0.1).
- Inference, elastic weight aggregation (EWA), per cross-attention layer l: the reference vectors are the text
  encoder's final states of the concatenation of every concept's tokens, encoded with layer l's embeddings; the
  prompt is encoded with layer l's embeddings too; each reference token's cosine to each prompt token, max over
  the prompt, mean over each concept's token span, 4th power, L1-normalised over concepts -> w_{l,g}. Each
  adapted module of layer l's attn2 block (to_q, to_k, to_v, to_out.0) gets `Σ_g w_{l,g} · 0.8 · B^g A^g`.

Departs:
- The release also adds `MSE(B_new, 1)` to the consolidation loss (undocumented); left out: it pulls a LoRA's
  up-weights to one regardless of the data.
- w depends only on the text, so it is computed once per prompt (the release recomputes it at every denoising
  step); the images are the same.
- A negative cosine counts as 0 before the 4th power, which would otherwise turn dissimilarity into weight.

`cidm+tokens` exists because EWA's cosines do not separate concepts on a weak text encoder (the tiny world's,
three concepts after 60 steps: a prompt naming one gives it 0.17 to 0.50 of the 0.8 on average over the layers,
0.03 in the worst layer, and a prompt naming none spends the whole 0.8, most of it on the first concept). It keeps everything above and multiplies EWA's w_{l,g} by the token match (1 for a
concept all of whose tokens the prompt contains, as `lookup` decides, else 0), renormalised over the named
concepts in each layer. So a prompt naming one concept applies its expert at EWA's 0.8 in every layer, one naming
two splits the 0.8 between them by EWA's own per-layer scores (as CIDM splits it), and one naming none is the
base model. We chose this over a flat 0.8 per named concept because it changes only the routing signal and
keeps EWA's scale and sum over concepts, so the two rows differ in routing alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fl2t.data import Concept
from fl2t.errors import Fl2tError
from fl2t.expert import Expert
from fl2t.experts import ExpertModel, Regulariser, learn_expert
from fl2t.fusion import stack_experts
from fl2t.methods.base import Method, MethodSettings, Tokenize, lora_layers, mixed_sampler
from fl2t.methods.lookup import named
from fl2t.pipeline import ExpertPipeline
from fl2t.sampling import Sampler
from fl2t.text import cross_attention_processor_names, encode_layerwise

EWA_SCALE = 0.8


class CIDMSettings(MethodSettings):
    cidm_lambda: float = Field(0.1, ge=0, description="weight of the consolidation loss against earlier LoRAs")
    ewa_scale: float = Field(EWA_SCALE, gt=0, description="scale of the aggregated update (the release's 0.8)")


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
            settings = self.ctx.learn.model_copy(update={"lora_attention": "cross", "layerwise": True})
            expert = learn_expert(concept, self.fresh_base(), settings, on_step=self.ctx.on_step, regulariser=reg)
            self.library.add(expert)
        self._done(concept.name)

    def sampler(self, concept: str | None = None) -> Sampler:
        experts = self.experts()
        pipe = self.base_pipeline(experts)
        return mixed_sampler(pipe, experts, self.module_weights(pipe, experts))

    def module_weights(self, pipe: ExpertPipeline, experts: list[Expert]) -> Callable[[str], torch.Tensor]:
        """prompt -> (M, G): the weight of each expert on each adapted module (in `stack_experts` order), its
        cross-attention layer's row of `layer_weights`, scaled by `ewa_scale` (EWA's 0.8); computed once per prompt."""
        ewa = ElasticWeights(pipe, experts)
        layer = module_layers(pipe.unet, stack_experts(experts, pipe.unet).modules)  # (M,)
        cache: dict[str, torch.Tensor] = {}

        def weights(prompt: str) -> torch.Tensor:
            if prompt not in cache:
                w = self.layer_weights(ewa, prompt)  # (L, G), or (1, G) with plain embeddings
                cache[prompt] = self.settings.ewa_scale * (w[layer] if w.shape[0] > 1 else w.expand(len(layer), -1))
            return cache[prompt]

        return weights

    def layer_weights(self, ewa: ElasticWeights, prompt: str) -> torch.Tensor:
        """(L, G): EWA's weights per cross-attention layer, each row summing to 1."""
        return ewa(prompt)


class CIDMTokens(CIDM):
    """`cidm` whose weights keep only the concepts the prompt names (see the module docstring)."""

    name = "cidm+tokens"

    def layer_weights(self, ewa: ElasticWeights, prompt: str) -> torch.Tensor:
        match = named(ewa.pipe, ewa.experts, prompt)  # (G,)
        w = ewa(prompt) * match  # (L, G)
        total = w.sum(-1, keepdim=True)
        # named concepts whose EWA scores are all zero share the layer equally
        return torch.where(total > 0, w / total.clamp(min=1e-12), match / match.sum().clamp(min=1))


class ElasticWeights:
    """CIDM's EWA weights of a prompt over the experts, per cross-attention layer: (L, G), each row summing to 1
    (L = 1 when the experts' embeddings are not layer-wise)."""

    def __init__(self, pipe: ExpertPipeline, experts: list[Expert]) -> None:
        self.pipe, self.experts = pipe, experts
        spans = [list(e.spec.tokens) for e in experts]
        self.refs = self._states(" ".join(t for span in spans for t in span))  # (L, n_tokens, D)
        self.bounds = torch.tensor([0] + [len(s) for s in spans]).cumsum(0).tolist()

    def __call__(self, prompt: str) -> torch.Tensor:
        sims = self.refs @ self._states(prompt).transpose(-1, -2)  # (L, reference tokens, prompt tokens)
        best = sims.max(dim=-1).values.clamp(min=0)  # (L, reference tokens)
        b = self.bounds
        s = torch.stack([best[..., b[g] : b[g + 1]].mean(-1) for g in range(len(b) - 1)], dim=-1) ** 4  # (L, G)
        return (s / s.sum(-1, keepdim=True).clamp(min=1e-12)).cpu()

    @torch.no_grad()
    def _states(self, text: str) -> torch.Tensor:
        """Unit-norm final text-encoder states of the text's own tokens (no start, end or padding), with each
        cross-attention layer's token embeddings: (L, n, D)."""
        pipe = self.pipe
        ids = pipe.tokenizer(text, truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
        hooks = pipe.token_hooks
        n_layers = hooks[0].n_layers if hooks else None
        states = encode_layerwise(pipe.text_encoder, ids, hooks, n_layers)  # (1, L*T, D)
        states = states.reshape(n_layers or 1, ids.shape[1], -1)[:, 1:-1]
        return F.normalize(states.float(), dim=-1)


def module_layers(unet: nn.Module, modules: list[str]) -> torch.Tensor:
    """(M,): the index of each module's cross-attention layer, in the order the layer-wise embeddings use."""
    blocks = {k.removesuffix(".processor"): i for i, k in enumerate(cross_attention_processor_names(unet))}
    layers = []
    for m in modules:
        block, sep, _ = m.partition(".attn2.")
        if not sep or f"{block}.attn2" not in blocks:
            raise Fl2tError(
                f"cidm adapts cross-attention only, but an expert adapts {m}; "
                "its state predates that: remove the method's state folder and learn again"
            )
        layers.append(blocks[f"{block}.attn2"])
    return torch.tensor(layers)
