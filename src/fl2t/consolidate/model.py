"""The consolidated model of Step 2: proxies, the set-invariant decoder, relevance heads and gates.

Shapes: G concepts, d the text encoder's width, T prompt tokens, L adapted UNet layers, r the LoRA rank.
Nothing here is indexed by a concept's position: every weight is shared across concepts, and the proxies
carry no positional encoding, so permuting the concepts permutes every output the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fl2t.config import ConsolidateSettings


class ProxyDecoderLayer(nn.Module):
    """Pre-norm block: self-attention among proxies, cross-attention proxies -> prompt tokens, MLP."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, proxy_attention: bool):
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
    """proxies (G, d) -> decoder(prompt) -> Z (B, G, d) -> relevance alpha (B, L, G) and gates gamma (B, L, G, r)."""

    def __init__(self, proxies: torch.Tensor, layer_shapes: dict[str, tuple[int, int]], rank: int, settings: ConsolidateSettings):
        super().__init__()
        G, d = proxies.shape
        L = len(layer_shapes)
        heads = settings.heads if d % settings.heads == 0 else 1
        self.rank = rank
        self.proxies = nn.Parameter(proxies.detach().clone().float())  # (G, d), initialised from C_g
        self.layers = nn.ModuleList(
            ProxyDecoderLayer(d, heads, settings.mlp_ratio, settings.proxy_attention) for _ in range(settings.decoder_layers)
        )
        self.out_norm = nn.LayerNorm(d)
        self.relevance = nn.Linear(d, L)  # s_{l,g} = head_l(Z_g), all L heads in one matrix
        # ... + match_scale_l * n_g(p), n_g the share of concept g's tokens the prompt contains: a prompt that names a
        # concept selects it from the first step. (The best cosine between P_g and the prompt's token states, tried
        # first, does not separate concepts: a small text encoder's states are mostly context, and base prompts
        # matched some proxy better than concept prompts matched their own.) Scale and threshold set by `init_routing`.
        self.match_scale = nn.Parameter(torch.ones(L))
        self.none_logit = nn.Parameter(torch.zeros(L))  # per layer, the logit of "none of them"
        self.gate = nn.Linear(d, L * rank) if settings.gates else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, 3.0)  # gamma starts near 1: every feature of an expert in use
        self.prompt_proj = nn.Linear(d, d) if settings.contrastive else None
        # Shared LoRA per layer: A (r_s, in) small random, B (out, r_s) zero, so it starts as no change.
        self.shared_A = nn.ParameterDict()
        self.shared_B = nn.ParameterDict()
        if settings.shared:
            g = torch.Generator().manual_seed(0)
            for name, (fan_in, fan_out) in layer_shapes.items():
                key = name.replace(".", "__")
                self.shared_A[key] = nn.Parameter(torch.randn(settings.shared_rank, fan_in, generator=g) / fan_in**0.5)
                self.shared_B[key] = nn.Parameter(torch.zeros(fan_out, settings.shared_rank))

    def shared_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        if not len(self.shared_A):
            return None
        return {k.replace("__", "."): (self.shared_A[k], self.shared_B[k]) for k in self.shared_A}

    def decode(self, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        """Z: (B, G, d), the proxies decoded against each prompt."""
        z = self.proxies.unsqueeze(0).expand(text.shape[0], -1, -1)
        for layer in self.layers:
            z = layer(z, text, text_pad)
        return self.out_norm(z)

    @torch.no_grad()
    def init_routing(self, margin: float) -> None:
        """A prompt naming concept g gives it a logit `margin + log G` above "none"; naming none, "none" stands as far
        above every concept, so with relevance heads still near zero either choice holds about 1/(1 + e^-margin)."""
        G = self.proxies.shape[0]
        gap = margin + math.log(max(G, 1))
        self.match_scale.fill_(2 * gap)
        self.none_logit.fill_(gap)

    def weights(self, z: torch.Tensor, named: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """alpha (B, L, G): softmax over G concepts + "none", the none column dropped; gamma (B, L, G, r)."""
        B, G, _ = z.shape
        logits = self.relevance(z).transpose(1, 2) + self.match_scale.view(1, -1, 1) * named.unsqueeze(1)  # (B, L, G)
        none = self.none_logit.view(1, -1, 1).expand(B, -1, 1)  # (B, L, 1)
        alpha = torch.softmax(torch.cat([logits, none], dim=-1), dim=-1)[..., :G]
        gamma = None
        if self.gate is not None:
            gamma = torch.sigmoid(self.gate(z).view(B, G, -1, self.rank)).transpose(1, 2)  # (B, L, G, r)
        return alpha, gamma

    def forward(self, text: torch.Tensor, text_pad: torch.Tensor, named: torch.Tensor):
        """named (B, G): the share of each concept's tokens each prompt contains (`concepts_named`)."""
        z = self.decode(text, text_pad)
        alpha, gamma = self.weights(z, named)
        return alpha, gamma, z

    def contrastive_loss(self, text: torch.Tensor, text_pad: torch.Tensor, z: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
        """InfoNCE between the pooled prompt state and the decoded proxies; positives (B, G) bool, >= 1 per row."""
        keep = (~text_pad).unsqueeze(-1).float()
        pooled = self.prompt_proj((text * keep).sum(1) / keep.sum(1).clamp(min=1))  # (B, d)
        logits = torch.einsum("bd,bgd->bg", F.normalize(pooled, dim=-1), F.normalize(z, dim=-1)) / temperature
        log_p = logits.log_softmax(-1)
        return -(torch.logsumexp(log_p.masked_fill(~positives, float("-inf")), dim=-1)).mean()
