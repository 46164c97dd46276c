"""What Step 2's training and inference share: the set's canonical order and hash, the decoder's view of a prompt,
which concepts a prompt names, and the adapted layers' shapes."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from fl2t.expert import Expert
from fl2t.fusion import ExpertStack
from fl2t.pipeline import ExpertPipeline

PROMPT_CHUNK = 256  # prompts per text-encoder call: the pool grows with G


def canonical(experts: list[Expert]) -> list[Expert]:
    """The set's canonical order: by content hash, independent of arrival order."""
    return sorted(experts, key=lambda e: e.content_hash)


def set_hash(experts: list[Expert]) -> str:
    """The set's identity: sha256 over its experts' content hashes, in any order."""
    return hashlib.sha256("".join(sorted(e.content_hash for e in experts)).encode()).hexdigest()


def prompt_states(pipe: ExpertPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet conditioning (P, T or L*T, D), decoder input (P, T, D) and its padding mask (P, T), frozen encoder."""
    device = pipe.unet.device
    with torch.no_grad():
        chunks = [prompts[i : i + PROMPT_CHUNK] for i in range(0, len(prompts), PROMPT_CHUNK)]
        unet_states = torch.cat([pipe.encode_prompt(chunk, device, 1, False)[0] for chunk in chunks])
    T = pipe.tokenizer.model_max_length
    text = unet_states.view(len(prompts), -1, T, unet_states.shape[-1]).mean(1)  # layer-wise: mean over layers
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=T, truncation=True, return_tensors="pt").input_ids
    eos = (ids == pipe.tokenizer.eos_token_id).int().argmax(-1, keepdim=True)  # first end-of-text token
    pad = torch.arange(T).unsqueeze(0) > eos
    return unet_states, text, pad.to(device)


def concepts_named(pipe: ExpertPipeline, experts: list[Expert], prompts: list[str]) -> torch.Tensor:
    """(P, G): the share of expert g's tokens that prompt p contains (1.0 when the prompt names the concept)."""
    T = pipe.tokenizer.model_max_length
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=T, truncation=True, return_tensors="pt").input_ids
    out = torch.zeros(len(prompts), len(experts))
    for g, e in enumerate(experts):
        for tid in pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens):
            out[:, g] += (ids == tid).any(-1).float() / len(e.spec.tokens)
    return out.to(pipe.unet.device)


def layer_shapes(unet: nn.Module, stack: ExpertStack) -> dict[str, tuple[int, int]]:
    """(in, out) features of each layer the experts adapt, in the stack's order."""
    return {m: (unet.get_submodule(m).in_features, unet.get_submodule(m).out_features) for m in stack.modules}
