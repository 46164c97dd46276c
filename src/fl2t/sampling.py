"""One seeded, batched way to generate images from a diffusers text-to-image pipeline.

The benchmark, the world's checks and every continual method generate through `Sampler`: one seed per image
(`torch.Generator().manual_seed(seed)`, on the CPU), so the same prompts and seeds give the same images
whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class Sampler:
    """Generates images for prompts, one seed per image, `batch` images per pipeline call (the prompts of a call
    may differ). `arm(prompts)` and `disarm()` bracket each call: methods whose update depends on the prompt
    arm per-sample hooks there (the same update fusing gives, computed per image). `autocast`: a lower precision
    (torch.bfloat16, torch.float16) the denoising runs in on a GPU, as mixed-precision training does; None: the
    pipeline's own dtype."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        arm: Callable[[list[str]], None] | None = None,
        disarm: Callable[[], None] | None = None,
        batch: int = 16,
        call: Callable[..., Any] | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.pipe, self.arm, self.disarm, self.batch, self.autocast = pipe, arm, disarm, batch, autocast
        self.call = call or pipe  # what generates: the pipeline, or its plain diffusers __call__

    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int = 25,
        guidance: float = 5.0,
        size: int | None = None,
    ) -> list[Image.Image]:
        """One image per prompt, made from its seed; `size` None: the pipeline's own resolution."""
        images: list[Image.Image] = []
        for i in range(0, len(prompts), self.batch):
            chunk = list(prompts[i : i + self.batch])
            if self.arm:
                self.arm(chunk)
            precision = torch.autocast(self.pipe.device.type, self.autocast, enabled=self.autocast is not None)
            try:
                with precision:
                    images += self.call(
                        chunk,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        height=size,
                        width=size,
                        generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + self.batch]],
                    ).images
            finally:
                if self.disarm:
                    self.disarm()
        return images
