"""A base model's pictures of a few prompts, 8 seeds each, one row per prompt (what a base draws zero-shot).

    python tools/world_zero_shot.py BASE OUT.png ["PROMPT" ...]

Default prompts: two-colour patterned objects, the kind of look a world concept has (docs/world.md).
"""

from __future__ import annotations

import sys

import torch
from diffusers import StableDiffusionPipeline

from fl2t.images import image_grid
from fl2t.sampling import Sampler

PROMPTS = (
    "a red and yellow striped star on a black background",
    "a green and red striped circle on a gray background",
    "a blue and yellow checkered diamond",
    "a red and yellow striped square on a white background",
)


def main(base: str, out: str, *prompts: str) -> None:
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    texts = [p for p in (prompts or PROMPTS) for _ in range(8)]
    images = Sampler(pipe, batch=32)(texts, list(range(len(texts))), 25, 5.0)
    image_grid(images, columns=8).save(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
