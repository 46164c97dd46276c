"""FL2TPipeline: generation with a consolidated library, at the base model's speed.

For each distinct prompt the relevance weights alpha and gates gamma are computed once, the aggregated update
is fused into the UNet weights once, the whole sampling loop (conditional and unconditional passes of
classifier-free guidance alike) runs on the fused weights, and the UNet gets its exact weights back afterwards.
With span restriction (the consolidated model's `span` setting, or `span=True`) the experts of the concepts a prompt
names update the cross-attention keys and values of their own tokens only (`fl2t.span`); the rest is fused as above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from fl2t.consolidate.common import canonical, concepts_named, prompt_states, set_hash
from fl2t.consolidate.model import ConsolidatedModel
from fl2t.errors import Fl2tError
from fl2t.expert import Expert
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.library import Library
from fl2t.pipeline import ExpertPipeline
from fl2t.span import SpanKV, prompt_ids


class FL2TPipeline(ExpertPipeline):
    """All of a library's concepts, consolidated. Called exactly like diffusers' StableDiffusionPipeline.

        pipe = FL2TPipeline.from_pretrained(library="my-lib")
        image = pipe("a photo of <my-dog> dog next to <my-toy> toy").images[0]

    The relevance and gates come from the library's consolidated model, which must be for its current set.
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | None = None,
        *,
        library: str | Path | Library,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        span: bool | None = None,
    ) -> FL2TPipeline:
        self, lib = cls.for_library(library, pretrained_model_name_or_path, torch_dtype)
        self.experts = canonical(lib.experts())
        for e in self.experts:
            self.add_expert_tokens(e)
        if device is not None:
            self.to(device)
        self.consolidated, self.aggregated = _load_consolidated(lib, self.experts, self.unet)
        token_ids = [self.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in self.experts]
        if span is None:  # as Step 2 trained it
            span = self.consolidated.config.settings.span
        self.span = SpanKV(self.unet, self.aggregated.stack, token_ids) if span else None
        return self

    @property
    def concept_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @torch.no_grad()
    def weights_for(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """alpha (L, G) and gamma (L, G, r) for one prompt."""
        _, text, pad = prompt_states(self, [prompt])
        alpha, gamma, _ = self.consolidated(text.float(), pad, concepts_named(self, self.experts, [prompt]))
        return alpha[0], None if gamma is None else gamma[0]

    def relevance(self, prompt: str) -> dict[str, dict[str, float]]:
        """Per adapted UNet layer: the weight alpha of every concept (each its own decision, in [0, 1]), and "none",
        the chance that no concept applies (the product of 1 - alpha)."""
        alpha, _ = self.weights_for(prompt)
        out = {}
        for name, row in zip(self.aggregated.stack.modules, alpha.tolist()):
            out[name] = {**dict(zip(self.concept_names, row)), "none": float(torch.prod(1 - torch.tensor(row)))}
        return out

    def arm(self, prompts: list[str]) -> None:
        """Arm the per-sample hooks (and span restriction) for a batch of prompts, conditional passes only or with
        classifier-free guidance as diffusers lays the batch out; `disarm()` after."""
        weights = [self.weights_for(p) for p in prompts]
        alpha = torch.stack([a for a, _ in weights])
        gamma = None if weights[0][1] is None else torch.stack([g for _, g in weights])
        if self.span is not None:
            alpha = self.span.arm(prompt_ids(self.tokenizer, prompts), alpha, gamma)
        self.aggregated.set(alpha, gamma, shared=True)

    def disarm(self) -> None:
        self.aggregated.off()
        if self.span is not None:
            self.span.off()

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *args: Any,
        negative_prompt: str | list[str] | None = None,
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        if prompt is None or kwargs.get("prompt_embeds") is not None:
            raise Fl2tError("FL2TPipeline needs the prompt text (it picks the concepts from it), not prompt_embeds")
        if args:
            raise TypeError("pass FL2TPipeline arguments by keyword, as with StableDiffusionPipeline")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * len(prompts)
        return_dict = kwargs.pop("return_dict", True)
        n = kwargs.get("num_images_per_prompt") or 1
        images: list = [None] * len(prompts)
        for p in dict.fromkeys(prompts):  # one fuse per distinct prompt
            idx = [i for i, q in enumerate(prompts) if q == p]
            alpha, gamma = self.weights_for(p)
            if self.span is not None:
                guided = kwargs.get("guidance_scale", 7.5) > 1  # diffusers' default; 1 or less: no unconditional half
                gammas = None if gamma is None else gamma[None]
                alpha = self.span.arm(prompt_ids(self.tokenizer, [p]), alpha[None], gammas, guided)[0]
            self.aggregated.fuse(alpha, gamma, shared=True)
            try:
                neg = [negatives[i] for i in idx]
                neg = None if all(x is None for x in neg) else neg
                out = super().__call__([p] * len(idx), negative_prompt=neg, **kwargs)
            finally:
                self.aggregated.unfuse()
                if self.span is not None:
                    self.span.off()
            for j, i in enumerate(idx):
                images[i] = out.images[j * n : (j + 1) * n]
        flat = [im for group in images for im in group]
        if isinstance(flat[0], np.ndarray):
            flat = np.stack(flat)
        elif isinstance(flat[0], torch.Tensor):
            flat = torch.stack(flat)
        if not return_dict:
            return (flat, None)
        return StableDiffusionPipelineOutput(images=flat, nsfw_content_detected=None)


def _load_consolidated(
    lib: Library, experts: list[Expert], unet: torch.nn.Module
) -> tuple[ConsolidatedModel, AggregatedLoRA]:
    """The library's consolidated model for exactly these experts (canonical order), on the UNet's device, its
    update hooked into the UNet."""
    folder = lib.consolidated_dir()
    if ConsolidatedModel.load_config(folder).set_hash != set_hash(experts):
        raise Fl2tError(
            f"library {lib.path}: the consolidated model is for another set of concepts; "
            f"run `fl2t consolidate --library {lib.path}`"
        )
    model = ConsolidatedModel.from_pretrained(folder).to(unet.device)
    stack = stack_experts(experts, unet)
    if list(model.config.layer_shapes) != stack.modules:
        raise Fl2tError(
            f"library {lib.path}: the consolidated model adapts other UNet layers than its experts; "
            f"run `fl2t consolidate --library {lib.path}`"
        )
    return model, AggregatedLoRA(unet, stack, model.shared_factors())
