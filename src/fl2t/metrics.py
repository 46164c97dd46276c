"""The field's metrics (DESIGN §4), computed with transformers models directly.

Every function takes embeddings or model objects, so real CLIP ViT-B/32 and DINO ViT-S/16 (by hub id or local
path) and the tiny world's evaluator go through the same code:

    clip = ClipEvaluator.load("openai/clip-vit-base-patch32")     # or fl2t.world.evaluator_path()
    ia = image_alignment(clip.image_embeds(generated), clip.image_embeds(references))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from fl2t.errors import Fl2tError


def _load(cls: type, name: str | Path, what: str) -> Any:
    try:
        return cls.from_pretrained(str(name), use_safetensors=True)
    except OSError as e:
        raise Fl2tError(
            f"cannot load the {what} {name!s}: no safetensors weights there (or not in the local hub cache); "
            "give a local folder saved with save_pretrained"
        ) from e


class ClipEvaluator:
    """CLIP image and text embeddings, unit norm. Loads any CLIPModel folder or hub id."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def load(cls, name: str | Path, device: torch.device | str = "cpu") -> ClipEvaluator:
        from transformers import CLIPModel, CLIPProcessor

        model = _load(CLIPModel, name, "CLIP evaluator").to(device)
        return cls(model, CLIPProcessor.from_pretrained(str(name)))

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm image embeddings."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        e = self.model.get_image_features(pixel_values=pixels.to(self.model.device, self.model.dtype))
        e = e.pooler_output if hasattr(e, "pooler_output") else e
        return F.normalize(e.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings (prompts cut at CLIP's 77 tokens)."""
        tok = self.processor(
            text=list(texts), return_tensors="pt", padding="max_length", max_length=77, truncation=True
        )
        ids, mask = tok.input_ids.to(self.model.device), tok.attention_mask.to(self.model.device)
        e = self.model.get_text_features(input_ids=ids, attention_mask=mask)
        e = e.pooler_output if hasattr(e, "pooler_output") else e
        return F.normalize(e.float(), dim=-1).cpu()


class DinoEvaluator:
    """DINO ViT CLS features, unit norm (the field uses facebook/dino-vits16). Any transformers ViT folder."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def load(cls, name: str | Path, device: torch.device | str = "cpu") -> DinoEvaluator:
        from transformers import AutoImageProcessor, AutoModel

        model = _load(AutoModel, name, "DINO evaluator").to(device)
        return cls(model, AutoImageProcessor.from_pretrained(str(name)))

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        cls_token = self.model(pixel_values=pixels.to(self.model.device, self.model.dtype)).last_hidden_state[:, 0]
        return F.normalize(cls_token.float(), dim=-1).cpu()  # (N, D)


CLASS = "class"  # the label of an image nearest the base model's images of its class word


def image_alignments(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per generated image, its mean cosine to the references: (N,), from (N, D) and (M, D) unit-norm inputs."""
    return (generated @ references.T).mean(dim=1)


def image_alignment(generated: torch.Tensor, references: torch.Tensor) -> float:
    """IA: mean cosine over every (generated, reference) pair; inputs (N, D) and (M, D), unit norm."""
    return float(image_alignments(generated, references).mean())


def reference_alignment(references: torch.Tensor) -> float:
    """The references' mean IA among themselves (distinct pairs): what a perfect copy of the concept scores."""
    n = len(references)
    if n < 2:
        raise Fl2tError("normalised IA needs at least 2 reference images")
    sims = references @ references.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def normalised_image_alignment(generated: torch.Tensor, references: torch.Tensor) -> float:
    """IA divided by the references' own mean IA (1.0: as close to the references as they are to each other)."""
    return image_alignment(generated, references) / reference_alignment(references)


def text_alignments(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Per image, CLIPScore 2.5 · max(cos, 0) against its matched text: (N,), from (N, D) unit-norm inputs."""
    return 2.5 * (images * texts).sum(-1).clamp(min=0)


def text_alignment(images: torch.Tensor, texts: torch.Tensor) -> float:
    """TA (CLIPScore): mean of 2.5 · max(cos, 0) over matched (image, text) rows; inputs (N, D), unit norm."""
    return float(text_alignments(images, texts).mean())


def class_prompt(prompt: str, tokens: Sequence[str], class_word: str) -> str:
    """The prompt with the concept's token(s) replaced by its class word, as TA is scored: a run of tokens
    followed by the class word is dropped ("a <dog> dog" -> "a dog"), any other run becomes the class word."""
    words = prompt.split()
    out: list[str] = []
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and words[j].rstrip(",.") in tokens:
            j += 1
        if j == i:
            out.append(words[i])
            i += 1
            continue
        tail = words[j - 1][len(words[j - 1].rstrip(",.")) :]  # punctuation after the last token
        followed = j < len(words) and words[j].rstrip(",.") == class_word.split()[0] and not tail
        if not followed:
            out.append(class_word + tail)
        i = j
    return " ".join(out)


def nearest_concepts(
    generated: torch.Tensor, references: dict[str, torch.Tensor], class_images: torch.Tensor | None
) -> list[str]:
    """Per generated image, the concept whose references it is nearest (mean cosine), or CLASS where the base
    model's images of the class word are nearer than every concept's: the rule of CA and of the confusion matrix
    (DESIGN §4). A tie goes to the concept listed first, the class last. Inputs (N, D) unit-norm embeddings."""
    labels = list(references)
    scores = [image_alignments(generated, r) for r in references.values()]
    if class_images is not None:
        labels.append(CLASS)
        scores.append(image_alignments(generated, class_images))
    best = torch.stack(scores).argmax(dim=0)  # (N,): the first of equal maxima
    return [labels[int(k)] for k in best]


def concept_accuracy(
    generated: torch.Tensor, own: str, references: dict[str, torch.Tensor], class_images: torch.Tensor | None
) -> float:
    """CA: the share of generated images nearer (mean cosine) to `own`'s references than to any other concept's
    references or to the base model's images of the class word (`nearest_concepts`). Inputs (N, D) unit norm."""
    labels = nearest_concepts(generated, references, class_images)
    return sum(label == own for label in labels) / len(labels)


def average_forgetting(R: Sequence[Sequence[float | None]]) -> float:
    """`mean_i (max_{t<T} R[t][i] - R[T][i])` over the concepts learned before the last task T.

    R[t][i]: the metric of concept i (in arrival order) after task t; None where i is not learned yet.
    """
    last = len(R) - 1
    drops = []
    for i in range(last):  # concept i arrives at task i; the last task's concept cannot be forgotten yet
        earlier = [R[t][i] for t in range(i, last) if R[t][i] is not None]
        if earlier and R[last][i] is not None:
            drops.append(max(earlier) - R[last][i])
    return float(sum(drops) / len(drops)) if drops else 0.0
