"""Generation with concept experts: a diffusers `StableDiffusionPipeline` that knows the library's concepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from fl2t.errors import Fl2tError
from fl2t.expert import Expert
from fl2t.library import Library
from fl2t.models import base_config_hash, load_base
from fl2t.text import ConceptTokenEmbeddings, add_tokens, set_layerwise_processors


def diffusers_lora(expert: Expert) -> dict[str, torch.Tensor]:
    """The expert's LoRA as diffusers' `load_lora_weights` / `save_lora_weights` key it ("unet.<module>.lora_A.weight")."""
    return {f"unet.{k}": v for k, v in expert.lora.items()}


class ExpertPipeline(StableDiffusionPipeline):
    """A `StableDiffusionPipeline` with concept experts applied: their tokens in the text encoder and their LoRAs
    in the UNet (one peft adapter per concept, named after it). Call it exactly like the diffusers pipeline.

        pipe = ExpertPipeline.from_library("my-lib", "dog")
        image = pipe("a photo of <dog> dog on a beach").images[0]
    """

    @classmethod
    def from_library(
        cls,
        library: str | Path | Library,
        concepts: str | list[str] | None = None,
        *,
        base: str | None = None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype = torch.float32,
    ) -> ExpertPipeline:
        self, lib = cls.for_library(library, base, torch_dtype)
        if concepts is None:
            names = lib.names()
            if len(names) != 1:
                raise Fl2tError(f"library {lib.path} has {len(names)} concepts; name one with --concept")
            concepts = names
        names = [concepts] if isinstance(concepts, str) else list(concepts)
        experts = [lib.expert(n) for n in names]
        for expert in experts:
            self.apply_expert(expert)
        if device is not None:
            self.to(device)
        return self

    @classmethod
    def for_library(
        cls, library: str | Path | Library, base: str | None = None, torch_dtype: torch.dtype = torch.float32
    ) -> tuple[ExpertPipeline, Library]:
        """(a pipeline on the library's base model, or `base` of the same architecture, with no expert yet; the library)"""
        lib = library if isinstance(library, Library) else Library(library)
        if not lib.exists:
            raise Fl2tError(f"library {lib.path}: no such library (no library.json); learn a concept into it first")
        base = base or lib.base["id"]
        pipe = load_base(base, dtype=torch_dtype)
        lib.check_base({"id": str(base), "config_hash": base_config_hash(pipe)})
        self = cls(**pipe.components, requires_safety_checker=False)
        self.set_progress_bar_config(disable=True)
        return self, lib

    @property
    def token_hooks(self) -> list[ConceptTokenEmbeddings]:
        if not hasattr(self, "_token_hooks"):
            self._token_hooks = []
        return self._token_hooks

    def apply_expert(self, expert: Expert) -> None:
        """Add one expert's tokens and LoRA; every applied expert's LoRA is active at weight 1."""
        self.add_expert_tokens(expert)
        self.load_lora_weights(diffusers_lora(expert), adapter_name=expert.name)
        names = list(dict.fromkeys(self.get_list_adapters().get("unet", [])))
        self.set_adapters(names, adapter_weights=[1.0] * len(names))

    def add_expert_tokens(self, expert: Expert) -> None:
        """Teach the tokenizer and text encoder an expert's tokens (layer-wise: a hook swaps them in per layer)."""
        if expert.layerwise:
            ids = add_tokens(self.tokenizer, self.text_encoder, expert.spec.tokens)
            hook = ConceptTokenEmbeddings(ids, expert.token_embeddings).to(self.text_encoder.device)
            self.token_hooks.append(hook.attach(self.text_encoder))
            n_layers = set_layerwise_processors(self.unet)
            if n_layers != expert.token_embeddings.shape[0]:
                raise Fl2tError(
                    f"expert {expert.name!r} has {expert.token_embeddings.shape[0]} layer-wise embeddings; "
                    f"this UNet has {n_layers} cross-attention layers"
                )
        else:
            add_tokens(self.tokenizer, self.text_encoder, expert.spec.tokens, rows=expert.token_embeddings)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hooks = self.token_hooks
        if not hooks or prompt_embeds is not None:
            return super().encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
                **kwargs,
            )
        # Layer-wise: one text-encoder pass per cross-attention layer, concatenated on the token axis (B, L*T, D).
        cond, uncond = [], []
        for layer in range(hooks[0].n_layers):
            for h in hooks:
                h.layer = layer
            c, u = super().encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompt,
                None,
                None,
                **kwargs,
            )
            cond.append(c)
            uncond.append(u)
        return torch.cat(cond, 1), (torch.cat(uncond, 1) if uncond[0] is not None else None)
