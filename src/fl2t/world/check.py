"""`fl2t world check`: measure the shipped world against issue 3's gates.

Each gate is a function from a `CheckContext` to table rows, so the gates that need Step 1 (concept
accuracy after `fl2t learn`, forgetting under a sequential LoRA) are added as further functions in GATES.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fl2t.errors import Fl2tError
from fl2t.world.build import verify_manifest
from fl2t.world.concepts import CONCEPTS, PROMPT_TEMPLATES, WorldConcept, reference_scenes
from fl2t.world.generator import BACKGROUNDS, COLOURS, SHAPES, Scene, caption, held_out_combos, random_scene, render

CHECK_SEED = 777
EVALUATOR_IMAGES = 300
BASE_SEEDS_PER_PROMPT = 1


class WorldEvaluator:
    """The tiny CLIP, used the way real CLIP is: image and text embeddings, zero-shot reading."""

    def __init__(self, path: Path):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm image embeddings."""
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        e = self.model.get_image_features(pixel_values=pixels)
        e = e.pooler_output if hasattr(e, "pooler_output") else e
        return torch.nn.functional.normalize(e, dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings."""
        tok = self.processor(text=list(texts), return_tensors="pt", padding="max_length", max_length=77)
        e = self.model.get_text_features(input_ids=tok.input_ids)
        e = e.pooler_output if hasattr(e, "pooler_output") else e
        return torch.nn.functional.normalize(e, dim=-1)

    @cached_property
    def _readout(self) -> tuple[list[tuple[str, str, str]], torch.Tensor]:
        labels = [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]
        texts = [f"a {c} {s} on a {b} background" for s, c, b in labels]
        return labels, self.text_embeds(texts)

    def read(self, images: Sequence[Image.Image]) -> list[tuple[str, str, str]]:
        """Zero-shot (shape, colour, background) of each image: the best of all 90 descriptions."""
        labels, texts = self._readout
        best = (self.image_embeds(images) @ texts.T).argmax(dim=1)
        return [labels[i] for i in best.tolist()]


@dataclass
class Row:
    gate: str
    value: float
    threshold: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold


@dataclass
class CheckContext:
    weights: Path
    guidance_scale: float = 5.0
    steps: int = 25
    samples: dict[str, list[Image.Image]] = field(default_factory=dict)  # kept for the docs grid

    @cached_property
    def evaluator(self) -> WorldEvaluator:
        return WorldEvaluator(self.weights / "evaluator")

    @cached_property
    def pipeline(self):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(self.weights / "base")
        pipe.set_progress_bar_config(disable=True)
        return pipe


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float, batch: int = 64):
    """Images for prompts, one seed each, in batches; deterministic on CPU."""
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        out = pipe(
            list(prompts[i : i + batch]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pil",
        )
        images += out.images
    return images


def gate_manifest(ctx: CheckContext) -> list[Row]:
    bad = verify_manifest(ctx.weights)
    detail = "all files match" if not bad else "differ: " + ", ".join(bad[:3])
    return [Row("shipped files match manifest.json sha256", float(not bad), 1.0, detail)]


def gate_evaluator(ctx: CheckContext) -> list[Row]:
    """Zero-shot attribute accuracy on fresh plain world pictures (a seed no build uses)."""
    rng = np.random.default_rng(CHECK_SEED)
    scenes = [random_scene(rng, rich=False, held_out=None) for _ in range(EVALUATOR_IMAGES)]
    read = ctx.evaluator.read([render(s) for s in scenes])
    rows = []
    for k, attr in enumerate(("shape", "colour", "background")):
        acc = float(np.mean([r[k] == getattr(s, attr) for r, s in zip(read, scenes)]))
        rows.append(Row(f"evaluator reads {attr} (held-out pictures)", acc, 0.95, f"{len(scenes)} images"))
    return rows


def base_prompts() -> tuple[list[str], list[Scene]]:
    """Every held-out (shape, colour, background, position) combination as a prompt, BASE_SEEDS_PER_PROMPT times."""
    scenes = [
        Scene(shape=s, colour=c, background=b, position=p, size="large")
        for s, c, b, p in held_out_combos()
        for _ in range(BASE_SEEDS_PER_PROMPT)
    ]
    return [caption(s, with_size=False) for s in scenes], scenes


def gate_base(ctx: CheckContext) -> list[Row]:
    """The evaluator reads the requested shape and colour from the base model's pictures."""
    prompts, scenes = base_prompts()
    seeds = [CHECK_SEED + i for i in range(len(prompts))]
    images = generate(ctx.pipeline, prompts, seeds, ctx.steps, ctx.guidance_scale)
    ctx.samples["base"] = images
    read = ctx.evaluator.read(images)
    n_combos = len(held_out_combos())
    detail = f"{len(images)} images, {n_combos} held-out prompts, cfg {ctx.guidance_scale}, {ctx.steps} DDIM steps"
    rows = []
    for k, attr in enumerate(("shape", "colour")):
        acc = float(np.mean([r[k] == getattr(s, attr) for r, s in zip(read, scenes)]))
        rows.append(Row(f"base model: requested {attr} read back", acc, 0.80, detail))
    bg = float(np.mean([r[2] == s.background for r, s in zip(read, scenes)]))
    rows.append(Row("base model: requested background (info)", bg, 0.0, detail))
    return rows


def class_prompts(concept: WorldConcept) -> list[str]:
    """The concept's evaluation prompts with the concept taken out: what the base model makes without it."""
    templates = PROMPT_TEMPLATES[concept.kind]
    if concept.kind == "object":
        return [t.format(concept.class_word) for t in templates]
    return [t.replace(", in the style of {}", "").replace(" in the style of {}", "") for t in templates]


def concept_accuracy(
    generated: torch.Tensor, own: str, references: dict[str, torch.Tensor], class_images: torch.Tensor
) -> float:
    """Share of generated images nearer (mean cosine) to `own`'s references than to any other concept's
    references or to the base model's class images. All inputs are (N, D) unit-norm embeddings."""
    own_score = (generated @ references[own].T).mean(dim=1)  # (N,)
    rivals = [(generated @ r.T).mean(dim=1) for name, r in references.items() if name != own]
    rivals.append((generated @ class_images.T).mean(dim=1))
    best_rival = torch.stack(rivals).max(dim=0).values  # (N,)
    return float((own_score > best_rival).float().mean())


def gate_concept_separation(ctx: CheckContext, per_concept: int = 10, class_images: int = 10) -> list[Row]:
    """Concept accuracy of fresh renders of each concept: the ceiling a learned concept can reach, and
    proof that the evaluator tells each concept apart from the others and from its plain class."""
    ev = ctx.evaluator
    refs = {c.name: ev.image_embeds([render(s) for s in reference_scenes(c)]) for c in CONCEPTS}
    accs = []
    cache: dict[tuple[str, ...], torch.Tensor] = {}
    for k, c in enumerate(CONCEPTS):
        prompts = tuple(class_prompts(c)[:class_images])
        if prompts not in cache:
            seeds = [CHECK_SEED + 10_000 + i for i in range(len(prompts))]
            cache[prompts] = ev.image_embeds(generate(ctx.pipeline, prompts, seeds, ctx.steps, ctx.guidance_scale))
        rng = np.random.default_rng([CHECK_SEED, k])
        fresh = ev.image_embeds([render(c.scene(rng)) for _ in range(per_concept)])
        accs.append(concept_accuracy(fresh, c.name, refs, cache[prompts]))
    worst = CONCEPTS[int(np.argmin(accs))].name
    detail = f"{per_concept * len(CONCEPTS)} renders, {len(CONCEPTS)} concepts; lowest {worst} {min(accs):.2f}"
    return [Row("evaluator: fresh concept renders nearest own refs", float(np.mean(accs)), 0.95, detail)]


# Concept accuracy after `fl2t learn` and sequential-LoRA forgetting come here once Step 1 exists.
GATES: list[Callable[[CheckContext], list[Row]]] = [gate_manifest, gate_evaluator, gate_base, gate_concept_separation]


def run_checks(
    weights: Path, guidance_scale: float = 5.0, steps: int = 25, threads: int = 2
) -> tuple[list[Row], CheckContext]:
    weights = Path(weights)
    if not (weights / "base" / "model_index.json").is_file() or not (weights / "evaluator" / "config.json").is_file():
        raise Fl2tError(f"no built world in {weights}; run `fl2t world build --out {weights}` first")
    torch.set_num_threads(threads)
    ctx = CheckContext(weights, guidance_scale=guidance_scale, steps=steps)
    rows: list[Row] = []
    for gate in GATES:
        rows += gate(ctx)
    return rows, ctx


def image_grid(images: Sequence[Image.Image], columns: int, scale: int = 3, pad: int = 2) -> Image.Image:
    """Images side by side, scaled up with nearest-neighbour so pixels stay visible."""
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
