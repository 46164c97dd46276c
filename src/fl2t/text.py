"""Concept tokens in the text encoder, and layer-wise text states for the UNet's cross-attention (ED-LoRA).

A concept's tokens are added to the tokenizer; their embeddings either live in the text encoder's embedding
rows (plain) or are swapped in by a forward hook (`ConceptTokenEmbeddings`), which is what training and
layer-wise embeddings need. Layer-wise, the text encoder runs once per cross-attention layer and the UNet gets
the L results concatenated along the token axis, `(B, L*T, D)`; each cross-attention layer reads its own slice.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from fl2t.errors import Fl2tError


def check_new_tokens(tokenizer: CLIPTokenizer, tokens: list[str]) -> None:
    vocab = tokenizer.get_vocab()
    for t in tokens:
        if t in vocab or f"{t}</w>" in vocab or t.lower() in vocab or f"{t.lower()}</w>" in vocab:
            raise Fl2tError(
                f"token {t!r} is already a word of the tokenizer; choose a new token such as '<c-{t.strip('<>')}>'"
            )


def add_tokens(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, tokens: list[str], rows: torch.Tensor | None = None
) -> list[int]:
    """Add `tokens` to the tokenizer and give them embedding rows (`rows`: (n, d), or the mean embedding)."""
    check_new_tokens(tokenizer, tokens)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = (rows if rows is not None else weight[: min(ids)].mean(0, keepdim=True)).to(weight)
    return ids


def class_word_embedding(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, class_word: str) -> torch.Tensor:
    """Mean input embedding of the class word's BPE pieces, shape (d,): the init of a concept token."""
    ids = tokenizer(class_word, add_special_tokens=False).input_ids
    return text_encoder.get_input_embeddings().weight[ids].detach().float().mean(0)


class ConceptTokenEmbeddings(nn.Module):
    """Trainable embeddings of one concept's tokens, swapped into the text encoder's input by a forward hook.

    weight: (n_tokens, d), or (L, n_tokens, d) layer-wise; `layer` picks the row set for the next encoder call.
    """

    def __init__(self, token_ids: list[int], weight: torch.Tensor):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.layer = 0
        self._handle = None

    @property
    def n_layers(self) -> int | None:
        return self.weight.shape[0] if self.weight.dim() == 3 else None

    def attach(self, text_encoder: CLIPTextModel) -> ConceptTokenEmbeddings:
        self._handle = text_encoder.get_input_embeddings().register_forward_hook(self._hook)
        return self

    def detach_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]  # (B, T)
        match = input_ids.unsqueeze(-1) == self.token_ids.to(input_ids.device)  # (B, T, n)
        if not bool(match.any()):
            return output
        w = (self.weight[self.layer] if self.n_layers else self.weight).to(output.device)  # (n, d)
        swapped = match.to(w.dtype) @ w  # (B, T, d)
        return torch.where(match.any(-1, keepdim=True), swapped.to(output.dtype), output)


def encode_layerwise(
    text_encoder: CLIPTextModel, input_ids: torch.Tensor, hooks: list[ConceptTokenEmbeddings], n_layers: int | None
) -> torch.Tensor:
    """Final hidden states (B, T, D); layer-wise, (B, L*T, D) with layer l's states at [:, l*T:(l+1)*T]."""
    if not n_layers:
        return text_encoder(input_ids)[0]
    states = []
    for layer in range(n_layers):
        for h in hooks:
            h.layer = layer
        states.append(text_encoder(input_ids)[0])
    return torch.cat(states, dim=1)


def cross_attention_processor_names(unet: nn.Module) -> list[str]:
    """Processor keys of the UNet's cross-attention layers (`...attn2.processor`), in the UNet's order."""
    return [k for k in unet.attn_processors if k.endswith("attn2.processor")]


class LayerwiseCrossAttnProcessor:
    """Cross-attention that reads its own layer's slice of layer-wise text states (B, L*T, D) -> (B, T, D)."""

    def __init__(self, index: int, n_layers: int):
        self.index = index
        self.n_layers = n_layers
        self.inner = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.chunk(self.n_layers, dim=1)[self.index]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def set_layerwise_processors(unet: nn.Module) -> int:
    """Make every cross-attention layer read its own slice; returns L, the number of cross-attention layers."""
    names = cross_attention_processor_names(unet)
    procs = dict(unet.attn_processors)
    for i, k in enumerate(names):
        procs[k] = LayerwiseCrossAttnProcessor(i, len(names))
    unet.set_attn_processor(procs)
    return len(names)
