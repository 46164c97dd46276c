"""The consolidated model of Step 2: proxies, the set-invariant decoder, relevance heads and gates.

Shapes: G concepts, d the text encoder's width, T prompt tokens, L adapted UNet layers, r the LoRA rank.
Nothing here is indexed by a concept's position: every weight is shared across concepts, and the proxies
carry no positional encoding, so permuting the concepts permutes every output the same way.

On disk, as diffusers models are: `save_pretrained(folder)` writes `config.json` (a `ConsolidatedConfig`: the
settings, every shape needed to rebuild the model, the set it was made for) beside `model.safetensors`;
`from_pretrained(folder)` reads them back. `Library.save_consolidated` places such a folder in a library. Step 2 also
leaves `pair_anchors.safetensors` there: the composition teacher's latents of the pairs it trained, a cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fl2t.config import ConsolidateSettings
from fl2t.errors import Fl2tError
from fl2t.expert import FORMAT, SHA256
from fl2t.files import atomic_write_bytes, atomic_write_json, read_validated

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PAIR_ANCHORS_NAME = "pair_anchors.safetensors"  # the composition teacher's latents per trained pair, kept for reuse


class ConceptRef(BaseModel):
    """One expert of the set: its name and content hash."""

    model_config = ConfigDict(extra="forbid")
    name: str
    content_hash: str = Field(pattern=SHA256)


class ConsolidatedConfig(BaseModel):
    """config.json of a consolidated model."""

    model_config = ConfigDict(extra="forbid")
    format: int = Field(FORMAT, ge=FORMAT, le=FORMAT)
    settings: ConsolidateSettings
    n_concepts: int = Field(ge=1)  # G
    width: int = Field(ge=1)  # d, the text encoder's width
    rank: int = Field(ge=1)  # r, the experts' largest LoRA rank
    layer_shapes: dict[str, tuple[int, int]]  # adapted UNet layer -> (in, out) features, in the experts' stack order
    set_hash: str = ""  # the set it was made for (`fl2t.consolidate.set_hash`); empty for a model made by hand
    concepts: list[ConceptRef] = []  # the set's experts in canonical order (empty for a model made by hand)

    @model_validator(mode="before")
    @classmethod
    def _made_before_the_lookup(cls, data: Any) -> Any:
        """A model saved before `relevance` existed was trained (the only Step 2 then): it loads as 'learned'."""
        if isinstance(data, dict) and isinstance(data.get("settings"), dict) and "relevance" not in data["settings"]:
            return {**data, "settings": {**data["settings"], "relevance": "learned"}}
        return data

    @model_validator(mode="after")
    def _one_concept_per_proxy(self) -> ConsolidatedConfig:
        if self.concepts and len(self.concepts) != self.n_concepts:
            raise ValueError(f"{len(self.concepts)} concepts for {self.n_concepts} proxies")
        return self


class ProxyDecoderLayer(nn.Module):
    """Pre-norm block: self-attention among proxies, cross-attention proxies -> prompt tokens, MLP."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, proxy_attention: bool) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d) if proxy_attention else None
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True) if proxy_attention else None
        self.cross_norm = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, z: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        # z: (B, G, d) proxies; text: (B, T, d) prompt states; text_pad: (B, T), True where padding
        if self.self_attn is not None:
            h = self.self_norm(z)
            z = z + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.cross_norm(z)
        z = z + self.cross_attn(h, text, text, key_padding_mask=text_pad, need_weights=False)[0]
        return z + self.mlp(self.mlp_norm(z))


class ConsolidatedModel(nn.Module):
    """proxies (G, d) -> decoder(prompt) -> Z (B, G, d) -> relevance alpha (B, L, G) and gates gamma (B, L, G, r).

    `proxies` initialises P (G, d), normally from the experts' C_g; without it, zeros (weights to be loaded).
    """

    def __init__(self, config: ConsolidatedConfig, proxies: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        settings = config.settings
        G, d, L = config.n_concepts, config.width, len(config.layer_shapes)
        if proxies is None:
            proxies = torch.zeros(G, d)
        if tuple(proxies.shape) != (G, d):
            raise ValueError(f"proxies of shape {tuple(proxies.shape)} for a config of G={G}, d={d}")
        heads = settings.heads if d % settings.heads == 0 else 1
        self.rank = config.rank
        self.pair_anchors: dict[str, torch.Tensor] = {}  # pair key -> latents (N, C, h, w); saved beside the weights
        self.proxies = nn.Parameter(proxies.detach().clone().float())  # (G, d), initialised from C_g
        self.layers = nn.ModuleList(
            ProxyDecoderLayer(d, heads, settings.mlp_ratio, settings.proxy_attention)
            for _ in range(settings.decoder_layers)
        )
        self.out_norm = nn.LayerNorm(d)
        # The relevance heads: s_{l,g} = head_l(Z_g) + u_l n_g, all L heads in one matrix, n_g the share of concept g's
        # tokens the prompt contains (`concepts_named`), an input whose per-layer weight u_l is learned like the rest.
        # Each concept's weight is its own decision against the layer's "none" threshold,
        # alpha_{l,g} = sigmoid(s_{l,g} - none_l), so a prompt naming two concepts can give both their full strength.
        # At the start u = 2 margin and none = margin: a named concept weighs sigmoid(margin), any other
        # sigmoid(-margin) (the lookup, as a prior); Step 2 moves both per layer. (Tried: the heads on Z alone, u = 0.
        # On the world's text encoder the decoded proxies do not tell a concept's token from its class word: after 150
        # steps "a star" weighted the star concept 0.998 and prompts naming pastel weighted it 0.000.)
        self.relevance = nn.Linear(d, L)
        self.token_weight = nn.Parameter(torch.full((L,), 2.0 * settings.route_margin))
        self.none_logit = nn.Parameter(torch.full((L,), float(settings.route_margin)))
        self.gate = nn.Linear(d, L * config.rank) if settings.gates else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, 3.0)  # gamma starts near 1: every feature of an expert in use
        self.prompt_proj = nn.Linear(d, d) if settings.contrastive else None
        # Shared LoRA per layer: A (r_s, in) small random, B (out, r_s) zero, so it starts as no change.
        self.shared_A = nn.ParameterDict()
        self.shared_B = nn.ParameterDict()
        if settings.shared:
            g = torch.Generator().manual_seed(0)
            for name, (fan_in, fan_out) in config.layer_shapes.items():
                key = name.replace(".", "__")
                self.shared_A[key] = nn.Parameter(torch.randn(settings.shared_rank, fan_in, generator=g) / fan_in**0.5)
                self.shared_B[key] = nn.Parameter(torch.zeros(fan_out, settings.shared_rank))

    # -- on disk ------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json and model.safetensors (float32) into `folder`, and pair_anchors.safetensors when Step 2
        made pair anchors (the next consolidation reuses those of the pairs it trains again)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_NAME, st_save(tensors))
        if self.pair_anchors:
            anchors = {k: v.detach().cpu().float().contiguous() for k, v in sorted(self.pair_anchors.items())}
            atomic_write_bytes(folder / PAIR_ANCHORS_NAME, st_save(anchors))
        atomic_write_json(folder / CONFIG_NAME, self.config.model_dump(mode="json"), sort_keys=False)

    @staticmethod
    def load_config(folder: str | Path) -> ConsolidatedConfig:
        """The config.json of a saved model, validated; cheap (no weights read)."""
        return read_validated(ConsolidatedConfig, Path(folder) / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ConsolidatedModel:
        """The model saved in `folder` by `save_pretrained`, in eval mode, on the CPU. Reads safetensors only."""
        folder = Path(folder)
        config = cls.load_config(folder)
        path = folder / WEIGHTS_NAME
        try:
            tensors = st_load(path.read_bytes())
        except OSError as e:
            raise Fl2tError(
                f"{path}: cannot be read ({e}); consolidate the library again (`fl2t consolidate`)"
            ) from None
        except SafetensorError as e:
            raise Fl2tError(f"{path}: not a valid safetensors file ({e})") from None
        model = cls(config)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise Fl2tError(
                f"{folder}: consolidated weights do not fit this version of fl2t ({str(e).splitlines()[0]}); "
                "consolidate the library again (`fl2t consolidate`)"
            ) from None
        return model.eval()

    @staticmethod
    def load_pair_anchors(folder: str | Path) -> dict[str, torch.Tensor]:
        """The pair anchors a saved model kept (empty when it has none or they cannot be read: they are a cache)."""
        try:
            return st_load((Path(folder) / PAIR_ANCHORS_NAME).read_bytes())
        except (OSError, SafetensorError):
            return {}

    # -- the forward pass ---------------------------------------------------------------------------------------
    def shared_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """The shared LoRA per layer, (A (r_s, in), B (out, r_s)); None when the settings have none."""
        if not len(self.shared_A):
            return None
        return {k.replace("__", "."): (self.shared_A[k], self.shared_B[k]) for k in self.shared_A}

    def decode(self, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        """Z: (B, G, d), the proxies decoded against each prompt."""
        z = self.proxies.unsqueeze(0).expand(text.shape[0], -1, -1)
        for layer in self.layers:
            z = layer(z, text, text_pad)
        return self.out_norm(z)

    def logits(self, z: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
        """(B, L, G): s_{l,g} - none_l, the relevance logits; alpha = their sigmoid. named (B, G)."""
        s = self.relevance(z).transpose(1, 2) + self.token_weight.view(1, -1, 1) * named.unsqueeze(1)
        return s - self.none_logit.view(1, -1, 1)

    def weights(self, z: torch.Tensor, named: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """alpha (B, L, G) in (0, 1), each concept on its own; gamma (B, L, G, r). With `relevance: lookup`, alpha is
        1 on every layer for each concept all of whose tokens the prompt contains and 0 for every other."""
        B = z.shape[0]
        if self.config.settings.relevance == "lookup":
            return (named >= 1 - 1e-6).float().unsqueeze(1).expand(B, len(self.config.layer_shapes), -1), None
        alpha = torch.sigmoid(self.logits(z, named))
        gamma = None
        if self.gate is not None:
            gamma = torch.sigmoid(self.gate(z).view(B, z.shape[1], -1, self.rank)).transpose(1, 2)  # (B, L, G, r)
        return alpha, gamma

    def forward(
        self, text: torch.Tensor, text_pad: torch.Tensor, named: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """alpha (B, L, G), gamma (B, L, G, r) or None, Z (B, G, d) for prompt states text (B, T, d); named (B, G): the
        share of each concept's tokens each prompt contains (`concepts_named`)."""
        z = self.decode(text, text_pad)
        alpha, gamma = self.weights(z, named)
        return alpha, gamma, z

    def contrastive_loss(
        self, text: torch.Tensor, text_pad: torch.Tensor, z: torch.Tensor, positives: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """InfoNCE between the pooled prompt state and the decoded proxies; positives (B, G) bool, >= 1 per row."""
        keep = (~text_pad).unsqueeze(-1).float()
        pooled = self.prompt_proj((text * keep).sum(1) / keep.sum(1).clamp(min=1))  # (B, d)
        logits = torch.einsum("bd,bgd->bg", F.normalize(pooled, dim=-1), F.normalize(z, dim=-1)) / temperature
        log_p = logits.log_softmax(-1)
        return -(torch.logsumexp(log_p.masked_fill(~positives, float("-inf")), dim=-1)).mean()
