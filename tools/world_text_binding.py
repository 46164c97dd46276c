"""Does a tiny CLIP bind each colour to its shape and each shape to its side? On ground-truth renders of the pair
gate's held-out prompts and of 84 seen ones, the share of pictures whose image embedding is nearer its own caption
than the same caption with the two shapes exchanged (`train.swapped_shapes`: the colours stay where they are), and
than the caption with the two colours exchanged. 0.5 is chance: a text tower that reads a bag of words cannot tell
them apart, and neither can a base model conditioned on it (issue 14, docs/world.md).

    python tools/world_text_binding.py CLIP_DIR [CLIP_DIR ...]
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from transformers import CLIPModel, CLIPProcessor
from world_base_variant import seen_pairs  # this folder: the same 84 seen prompts as the variants' reads

from fl2t.metrics import ClipEvaluator
from fl2t.models import clip_tokenizer
from fl2t.world.generator import PairScene, pair_caption, render_any
from fl2t.worldkit import models
from fl2t.worldkit.check import pair_prompts
from fl2t.worldkit.train import swapped_shapes


def swapped_colours(p: PairScene) -> PairScene:
    return replace(p, left=replace(p.left, colour=p.right.colour), right=replace(p.right, colour=p.left.colour))


def binding(clip: ClipEvaluator, scenes: list[PairScene]) -> dict[str, float]:
    img = clip.image_embeds([render_any(p) for p in scenes])

    def text(ps: list[PairScene]) -> torch.Tensor:
        return clip.text_embeds([pair_caption(p) for p in ps])

    own = (img * text(scenes)).sum(-1)
    shapes = (img * text([swapped_shapes(p) for p in scenes])).sum(-1)
    colours = (img * text([swapped_colours(p) for p in scenes])).sum(-1)
    return {
        "vs shapes exchanged": float((own > shapes).float().mean()),
        "vs colours exchanged": float((own > colours).float().mean()),
    }


def main(*dirs: str) -> None:
    torch.set_num_threads(1)
    for d in dirs:
        processor = CLIPProcessor(image_processor=models.image_processor(), tokenizer=clip_tokenizer())
        clip = ClipEvaluator(CLIPModel.from_pretrained(d), processor)  # a text stage's CLIP has no processor saved
        for name, scenes in (("held-out pairs", pair_prompts()), ("seen pairs", seen_pairs())):
            print(d, name, {k: round(v, 3) for k, v in binding(clip, scenes).items()}, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
