"""FL2TPipeline: generation with a consolidated library, at the base model's speed.

For each distinct prompt the relevance weights alpha and gates gamma are computed once, the aggregated update
is fused into the UNet weights once, the whole sampling loop (conditional and unconditional passes of
classifier-free guidance alike) runs on the fused weights, and the UNet gets its exact weights back afterwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from fl2t.consolidate.train import canonical, concepts_named, load_consolidated, prompt_states
from fl2t.errors import Fl2tError
from fl2t.library import Library
from fl2t.pipeline import ExpertPipeline


class FL2TPipeline(ExpertPipeline):
    """All of a library's concepts, consolidated. Called exactly like diffusers' StableDiffusionPipeline.

        pipe = FL2TPipeline.from_pretrained(library="my-lib")
        image = pipe("a photo of <my-dog> dog next to <my-toy> toy").images[0]
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | None = None,
        *,
        library: str | Path | Library,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype = torch.float32,
    ) -> "FL2TPipeline":
        self, lib = cls.for_library(library, pretrained_model_name_or_path, torch_dtype)
        self.experts = canonical(lib.experts())
        for e in self.experts:
            self.add_expert_tokens(e)
        if device is not None:
            self.to(device)
        self.consolidated, self.aggregated = load_consolidated(lib, self.experts, self)
        self.consolidated.to(self.unet.device)
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
        """Per adapted UNet layer: the weight alpha of every concept, and of "none" (the rest to 1)."""
        alpha, _ = self.weights_for(prompt)
        out = {}
        for name, row in zip(self.aggregated.stack.modules, alpha.tolist()):
            out[name] = {**dict(zip(self.concept_names, row)), "none": max(0.0, 1.0 - sum(row))}
        return out

    def __call__(self, prompt: str | list[str] | None = None, *args, negative_prompt=None, **kwargs):
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
            self.aggregated.fuse(alpha, gamma, shared=True)
            try:
                neg = [negatives[i] for i in idx]
                out = super().__call__([p] * len(idx), negative_prompt=None if all(x is None for x in neg) else neg, **kwargs)
            finally:
                self.aggregated.unfuse()
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
