"""One world concept learned alone with the check's Step-1 settings, its concept accuracy split by what the prompt
says of the background (issue 14: where a concept's expert falls back to its plain class).

    THREADS=2 python tools/world_concept_alone.py WORLD CONCEPT [CONCEPT ...]

The same expert, prompts, seeds and rule as `fl2t world check --full`'s "every concept learned alone" row; per
concept, also (objects) the presence score's finds on the images CA calls the concept's own, as the check's
"presence on generations" row counts them, beside the presence score on the base model's images of the same prompts
with the concept described in the world's words instead of its token ("a small blue red-centred ring on a white
background"): what the base draws of the look without any expert.
(`BALANCED=1` drew every concept's references with their backgrounds cycling black, white, gray, an experiment until
the world's references became those in world v2.)
SETTINGS='{"steps": 800}': LearnSettings fields changed from the check's (an experiment; the check keeps tiny10's).
CAPTIONS: the references' captions other than the world's (docs/world.md "Style captions in the templates' forms"):
`one`, every caption in the first form (background and position named), as before 2026-12-05; `comma`, the styles'
in four forms with a comma before "in the style of" always; `objects`, the objects' in four forms too.
STYLE_REFERENCES: the styles' references drawn otherwise than the world's (docs/world.md "Style references on
varied content"): `varied`, five colours and five shapes, each once; `colours`, five colours each once, the world's
shapes; `six`, six references, every colour and every shape (one colour twice). With `SCORE_REFERENCES=world`, CA
reads the experts learned from those references against the world's references (whether a style's learning or CA's
reading of a varied reference set moves its CA).
GRID=FOLDER: also save FOLDER/<concept>.png, its five references above the first 16 images CA reads (twice the size).
Printed per concept: its CA, the seconds its expert took to learn (the anchors included), for the images CA
does not call its own, whose references (or the class's images) they are nearest, and, for the images presence does
not find an object concept in, the labels of the K nearest references of their crops (a plain look, "blue ring", is
the concept's shape and main colour without its pattern).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fl2t.images import image_grid
from fl2t.methods import METHODS, MethodContext
from fl2t.world import concepts
from fl2t.world.concepts import REFERENCES_PER_CONCEPT, STYLE_CAPTION_FORMS, WorldConcept, get_concept
from fl2t.world.generator import BACKGROUNDS, COLOURS, SHAPES, Scene, object_phrase, render
from fl2t.world.presence import Presence
from fl2t.worldkit import check

WORLD_REFERENCES = concepts.reference_scenes  # the world's draw, before STYLE_REFERENCES replaces it


def save_grid(path: Path, references: list[Image.Image], images: list[Image.Image]) -> None:
    """The references in the first row (the rest of it blank), the images eight to a row below, at twice their size."""
    blank = [Image.new("RGB", images[0].size)] * (8 - len(references))
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([*references, *blank, *images], columns=8, scale=2).save(path)


def other_captions(kind: str) -> None:
    """Replace the world concepts' caption rule by the CAPTIONS experiment's (see the module's docstring)."""
    world_caption = WorldConcept.caption

    def caption(self: WorldConcept, scene: Scene, index: int = 0) -> str:
        background, position = STYLE_CAPTION_FORMS[index % len(STYLE_CAPTION_FORMS)]
        if kind == "one":
            return world_caption(self, scene, 0)
        if self.kind == "style":
            text = world_caption(self, scene, index)
            return text if position else text.replace(" in the style of", ", in the style of")
        if kind != "objects":
            return world_caption(self, scene, index)
        text = f"a {scene.size} {self.subject}"
        return (
            text
            + (f" on a {scene.background} background" if background else "")
            + (f", {scene.position}" if position else "")
        )

    WorldConcept.caption = caption  # type: ignore[method-assign]


def other_style_references(kind: str) -> None:
    """Replace the styles' references by the STYLE_REFERENCES experiment's (see the module's docstring): the world's
    draw (backgrounds, positions, sizes), with the colours and shapes taken in turn from a seeded shuffle of each."""
    if kind not in ("varied", "colours", "six"):
        raise SystemExit(f"STYLE_REFERENCES={kind}: one of varied, colours, six")

    def reference_scenes(concept: WorldConcept, n: int = REFERENCES_PER_CONCEPT) -> list[Scene]:
        if concept.kind == "object":
            return WORLD_REFERENCES(concept, n)
        n = len(SHAPES) if kind == "six" else n
        place = (concepts.CONCEPTS + concepts.TUNING_CONCEPTS).index(concept)
        mix = np.random.default_rng([concepts.CONCEPT_SEED, place, 1])
        colours = [list(COLOURS)[j] for j in mix.permutation(len(COLOURS))]
        shapes = [SHAPES[j] for j in mix.permutation(len(SHAPES))]
        return [
            replace(s, colour=colours[i % len(colours)], **({} if kind == "colours" else {"shape": shapes[i]}))
            for i, s in enumerate(WORLD_REFERENCES(concept, n))
        ]

    concepts.reference_scenes = reference_scenes  # write_concept draws through it
    check.REFERENCES_PER_CONCEPT = len(SHAPES)  # CA's references: all of them (an object has five)


def main() -> None:
    world, names = Path(sys.argv[1]), sys.argv[2:]
    if os.environ.get("CAPTIONS"):
        other_captions(os.environ["CAPTIONS"])
    if os.environ.get("STYLE_REFERENCES"):
        other_style_references(os.environ["STYLE_REFERENCES"])
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    ctx = check.CheckContext(world, learn_overrides=json.loads(os.environ.get("SETTINGS", "{}")))
    s1, settings = ctx.step1, ctx.learn
    if os.environ.get("SCORE_REFERENCES", "world") != "world":
        raise SystemExit(f"SCORE_REFERENCES={os.environ['SCORE_REFERENCES']}: only 'world' is known")
    if os.environ.get("SCORE_REFERENCES"):  # CA against the world's references, whatever was learned
        for c in map(get_concept, names):
            if c.kind == "style":
                s1.refs[c.name] = ctx.evaluator.image_embeds([render(s, ctx.side) for s in WORLD_REFERENCES(c)])
    with tempfile.TemporaryDirectory() as tmp:
        lookup = METHODS["lookup"](MethodContext(str(world / "base"), settings, Path(tmp) / "w", Path(tmp) / "s"))
        learned = {}
        for name in names:
            t = time.time()
            lookup.learn(s1.concepts[name])
            learned[name] = time.time() - t
        sampler = lookup.sampler()
        presence = Presence(ctx.evaluator)
        for name in names:
            c = get_concept(name)
            ca, _, images, labels = s1.score(name, sampler)
            own = [label == name for label in labels]
            prompts, seeds = s1.prompts(name)
            by = defaultdict(list)
            for p, o in zip(prompts, own):
                by[next((b for b in BACKGROUNDS if f"{b} background" in p), "none named")].append(o)
            print(f"{name}: CA {ca:.3f}; learned in {learned[name]:.1f} s")
            if c.kind == "object":
                mine = [im for im, o in zip(images, own) if o]
                hits = presence(mine, [name])[:, 0]
                print(
                    f"  presence finds it in {hits.mean() if mine else 0.0:.2f} of the {len(mine)} images CA calls its own"
                )
                missed = [im for im, h in zip(mine, hits) if not h]
                if missed:  # what the score's K nearest references are where it does not find the concept
                    votes = presence.nearest(missed, *presence.object_bank(None))
                    near = Counter(label for per_crop in votes for crop in per_crop for label in crop)
                    print("  its misses' nearest references: " + ", ".join(f"{k} {n}" for k, n in near.most_common(4)))
                look = Scene(c.shape, c.colour, "black", "in the center", "small", c.pattern, c.colour2)
                words = object_phrase(look, False)
                base = ctx.base_images([p.replace(c.subject, words) for p in prompts], seeds)
                print(f"  the base, described as '{words}': presence {presence(base, [name])[:, 0].mean():.2f}")
            for bg, hits in sorted(by.items()):
                print(f"  prompt names {bg:10s} CA {np.mean(hits):.2f} ({len(hits)} images)")
            if os.environ.get("GRID"):
                save_grid(
                    Path(os.environ["GRID"]) / f"{name}.png",
                    s1.concepts[name].images[:REFERENCES_PER_CONCEPT],
                    images[:16],
                )
            misread = Counter(label for label in labels if label != name).most_common()
            if misread:
                print("  the others nearest: " + ", ".join(f"{label} {n}" for label, n in misread))


if __name__ == "__main__":
    main()
