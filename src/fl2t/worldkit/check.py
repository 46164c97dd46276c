"""`fl2t world check`: measure the shipped world against issue 3's gates.

Each gate is a function from a `CheckContext` to table rows, so the gates that need Step 1 (concept
accuracy after `fl2t learn`, forgetting under a sequential LoRA) are added as further functions in GATES.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from fl2t.errors import Fl2tError
from fl2t.metrics import ClipEvaluator, concept_accuracy, image_alignment, reference_alignment
from fl2t.sampling import Sampler
from fl2t.world.concepts import CONCEPTS, PROMPT_TEMPLATES, WorldConcept, get_concept, reference_scenes
from fl2t.world.generator import BACKGROUNDS, COLOURS, SHAPES, Scene, caption, held_out_combos, random_scene, render
from fl2t.worldkit.build import verify_manifest

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

CHECK_SEED = 777
CHECK_BATCH = 64  # images per pipeline call for the base model's samples
EVALUATOR_IMAGES = 300
BASE_SEEDS_PER_PROMPT = 1


class WorldEvaluator(ClipEvaluator):
    """The tiny CLIP, used the way real CLIP is (fl2t.metrics), plus zero-shot reading of a picture's attributes."""

    def __init__(self, path: Path) -> None:
        loaded = ClipEvaluator.load(path)
        super().__init__(loaded.model, loaded.processor)

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
    at_most: bool = False  # the gate is value <= threshold

    @property
    def passed(self) -> bool:
        return self.value <= self.threshold if self.at_most else self.value >= self.threshold

    @property
    def needs(self) -> str:
        return f"<= {self.threshold:g}" if self.at_most else (f">= {self.threshold:.2f}" if self.threshold else "-")


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
    def pipeline(self) -> StableDiffusionPipeline:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(self.weights / "base")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def base_images(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """The base model's images of the prompts, one seed each, at the check's steps and guidance."""
        return Sampler(self.pipeline, batch=CHECK_BATCH)(prompts, seeds, self.steps, self.guidance_scale)


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
    images = ctx.base_images(prompts, seeds)
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
            cache[prompts] = ev.image_embeds(ctx.base_images(prompts, seeds))
        rng = np.random.default_rng([CHECK_SEED, k])
        fresh = ev.image_embeds([render(c.scene(rng)) for _ in range(per_concept)])
        accs.append(concept_accuracy(fresh, c.name, refs, cache[prompts]))
    worst = CONCEPTS[int(np.argmin(accs))].name
    detail = f"{per_concept * len(CONCEPTS)} renders, {len(CONCEPTS)} concepts; lowest {worst} {min(accs):.2f}"
    return [Row("evaluator: fresh concept renders nearest own refs", float(np.mean(accs)), 0.95, detail)]


STEP1_CONCEPTS = ("stripestar", "checkdiamond", "bullseye")  # the first is measured; the others follow it
STEP1_SEEDS_PER_PROMPT = 4  # 20 templates x 4 = 80 images


class Step1:
    """Concept accuracy (DESIGN §4) of a world concept's generated images, against all ten concepts'
    references and the base model's images of its class word, with the references and class images cached."""

    def __init__(self, ctx: CheckContext, folder: Path) -> None:
        from fl2t.data import load_concept
        from fl2t.world.concepts import write_concept

        self.ctx = ctx
        ev = ctx.evaluator
        self.concepts = {c.name: load_concept(write_concept(c, folder / "concepts")) for c in CONCEPTS}
        self.refs = {n: ev.image_embeds(c.images) for n, c in self.concepts.items()}
        self._class: dict[str, torch.Tensor] = {}

    def prompts(self, name: str) -> tuple[list[str], list[int]]:
        spec = self.concepts[name].spec
        prompts = [t.format(spec.subject) for t in PROMPT_TEMPLATES[spec.kind] for _ in range(STEP1_SEEDS_PER_PROMPT)]
        return prompts, [CHECK_SEED + 20_000 + i for i in range(len(prompts))]

    def class_images(self, name: str) -> torch.Tensor:
        if name not in self._class:
            c = get_concept(name)
            texts = [t for t in class_prompts(c) for _ in range(STEP1_SEEDS_PER_PROMPT)]
            seeds = [CHECK_SEED + 30_000 + i for i in range(len(texts))]
            self._class[name] = self.ctx.evaluator.image_embeds(self.ctx.base_images(texts, seeds))
        return self._class[name]

    def score(self, name: str, sampler: Sampler) -> tuple[float, float, list[Image.Image]]:
        """(concept accuracy, normalised IA, the images) of `sampler`'s pictures of concept `name`."""
        prompts, seeds = self.prompts(name)
        images = sampler(prompts, seeds, self.ctx.steps, self.ctx.guidance_scale)
        emb = self.ctx.evaluator.image_embeds(images)
        ca = concept_accuracy(emb, name, self.refs, self.class_images(name))
        return ca, image_alignment(emb, self.refs[name]) / reference_alignment(self.refs[name]), images


def gate_step1(ctx: CheckContext) -> list[Row]:
    """One concept learned with `fl2t learn`'s defaults (time, concept accuracy, normalised IA against the base
    model's for the class word); then one LoRA continued through two more concepts, and the first concept's
    concept accuracy again: the forgetting FL2T exists to cure."""
    import tempfile
    import time

    from fl2t.config import LearnSettings
    from fl2t.methods import METHODS, MethodContext

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        s1 = Step1(ctx, folder)
        first = STEP1_CONCEPTS[0]
        settings = LearnSettings(checkpoint_every=0)  # fl2t learn's defaults (checkpoints only cost disk here)
        seq_ctx = MethodContext(
            base=str(ctx.weights / "base"), learn=settings, workdir=folder / "seq", store=folder / "store"
        )
        seq = METHODS["sequential"](seq_ctx)
        t0 = time.perf_counter()
        seq.learn(s1.concepts[first])  # task 1 of a sequential LoRA is exactly `fl2t learn` of the concept alone
        seconds = time.perf_counter() - t0
        ca1, nia1, images = s1.score(first, seq.sampler())
        ctx.samples[first] = images
        emb_class = s1.class_images(first)
        nia_base = image_alignment(emb_class, s1.refs[first]) / reference_alignment(s1.refs[first])
        for name in STEP1_CONCEPTS[1:]:
            seq.learn(s1.concepts[name])
        ca3, nia3, images3 = s1.score(first, seq.sampler())
        ctx.samples[f"{first} after {len(STEP1_CONCEPTS)} tasks"] = images3
    n = len(images)
    return [
        Row(
            f"learn {first} with fl2t learn's defaults (s)",
            seconds,
            60.0,
            f"{settings.steps} steps + {settings.num_anchors} anchors",
            at_most=True,
        ),
        Row(
            f"learned {first}: concept accuracy",
            ca1,
            0.80,
            f"{n} images; normalised IA {nia1:.3f} vs base model's '{get_concept(first).class_word}' {nia_base:.3f}",
        ),
        Row(
            f"sequential LoRA: {first} CA drop after {len(STEP1_CONCEPTS)} tasks (points)",
            100 * (ca1 - ca3),
            20.0,
            f"CA {ca1:.2f} -> {ca3:.2f}; normalised IA {nia1:.3f} -> {nia3:.3f} ({' -> '.join(STEP1_CONCEPTS)})",
        ),
    ]


GATES: list[Callable[[CheckContext], list[Row]]] = [
    gate_manifest,
    gate_evaluator,
    gate_base,
    gate_concept_separation,
    gate_step1,
]


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
