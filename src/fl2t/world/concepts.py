"""The tiny world's concepts: seven composite objects and three styles the base model never saw,
written as concept folders in the format users use, and the evaluation prompt templates per kind; and four
tuning-only concepts (`TUNING_CONCEPTS`) for choosing the methods' settings (`fl2t bench tune`), which no evaluated
benchmark uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fl2t.errors import Fl2tError
from fl2t.world.generator import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    PairScene,
    Scene,
    caption,
    object_phrase,
    render,
    render_pair,
)

CONCEPT_SEED = 20260301
REFERENCES_PER_CONCEPT = 5
# A style reference's caption names its content with the background and position it shows, in turn (background,
# position) both, neither, the background alone, the position alone, worded and punctuated as the style prompt
# templates below (as pretraining's captions, it leaves parts out): with every caption in the first form, a style's
# expert learned the style only where a prompt names a background too (docs/world.md "Style captions in the
# templates' forms"). Objects' keep the first form: their experts read lower with the forms in turn.
STYLE_CAPTION_FORMS = ((True, True), (False, False), (True, False), (False, True))


@dataclass(frozen=True)
class WorldConcept:
    """One concept of the world. Objects fix shape, pattern and colours; styles fix a way of rendering."""

    name: str
    token: str
    class_word: str
    kind: str  # "object" or "style"
    shape: str | None = None
    pattern: str | None = None
    colour: str | None = None
    colour2: str | None = None
    style: str | None = None

    @property
    def subject(self) -> str:
        """What a prompt template's `{}` is filled with."""
        return f"{self.token} {self.class_word}" if self.kind == "object" else self.token

    @property
    def appearance(self) -> tuple[str | None, str | None, str | None, str | None]:
        """(shape, pattern, colour, colour2): pretraining never draws this look."""
        return (self.shape, self.pattern, self.colour, self.colour2)

    def scene(self, rng: np.random.Generator) -> Scene:
        """A random picture of the concept: the concept's fixed look, everything else drawn from `rng`."""
        base = Scene(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
            position=list(POSITIONS)[rng.integers(len(POSITIONS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            jitter=int(rng.integers(2**31)),
        )
        if self.kind == "object":
            return replace(base, shape=self.shape, pattern=self.pattern, colour=self.colour, colour2=self.colour2)
        return replace(base, style=self.style)

    def caption(self, scene: Scene, index: int = 0) -> str:
        """Reference `index`'s caption: 'a small <c-stripestar> star on a black background, top left'; a style's
        names the picture's content in the form STYLE_CAPTION_FORMS[index % 4] gives, 'a red circle on a black
        background, top left, in the style of <s-outline>', 'a red circle in the style of <s-outline>', ..."""
        if self.kind == "object":
            return f"a {scene.size} {self.subject} on a {scene.background} background, {scene.position}"
        background, position = STYLE_CAPTION_FORMS[index % len(STYLE_CAPTION_FORMS)]
        # The pastel palette replaces the background, so its captions do not name one.
        text = caption(
            replace(scene, style=None),
            with_size=False,
            with_background=background and self.style != "pastel",
            with_position=position,
        )
        return text + ("," if position else "") + f" in the style of {self.token}"  # punctuated as the templates


CONCEPTS: tuple[WorldConcept, ...] = (
    WorldConcept("stripestar", "<c-stripestar>", "star", "object", "star", "striped", "red", "yellow"),
    WorldConcept("checkdiamond", "<c-checkdiamond>", "diamond", "object", "diamond", "checkered", "blue", "yellow"),
    WorldConcept("bullseye", "<c-bullseye>", "circle", "object", "circle", "bullseye", "purple", "yellow"),
    WorldConcept("splitsquare", "<c-splitsquare>", "square", "object", "square", "split", "green", "red"),
    WorldConcept("dottri", "<c-dottri>", "triangle", "object", "triangle", "dotted", "yellow", "purple"),
    WorldConcept("eyering", "<c-eyering>", "ring", "object", "ring", "centre-dot", "blue", "red"),
    WorldConcept("crossbox", "<c-crossbox>", "square", "object", "square", "crossed", "yellow", "blue"),
    WorldConcept("outline", "<s-outline>", "style", "style", style="outline"),
    WorldConcept("pastel", "<s-pastel>", "style", "style", style="pastel"),
    WorldConcept("mosaic", "<s-mosaic>", "style", "style", style="mosaic"),
)

# Concepts for tuning the methods' settings only (benchmarks/tune.yaml); no evaluated benchmark uses them, so a
# setting is never chosen on the concepts it is then scored on. Like the concepts above, looks the base model never
# saw: dotcircle's pattern is one pretraining draws, on a look its pictures never show (as the concepts above: the
# shipped base's 24000 pretraining pictures have no red purple-centred circle, and `pretraining_scenes` excludes it
# from now on); quarterdiamond and bandstar have patterns pretraining never draws, echo a rendering it never draws
# (generator.TUNING_PATTERNS, TUNING_STYLES).
TUNING_CONCEPTS: tuple[WorldConcept, ...] = (
    WorldConcept("dotcircle", "<c-dotcircle>", "circle", "object", "circle", "centre-dot", "red", "purple"),
    WorldConcept("quarterdiamond", "<c-quarterdiamond>", "diamond", "object", "diamond", "quartered", "green", "blue"),
    WorldConcept("bandstar", "<c-bandstar>", "star", "object", "star", "banded", "blue", "red"),
    WorldConcept("echo", "<s-echo>", "style", "style", style="echo"),
)

# 20 evaluation prompts per kind. Objects: `{}` is "<token> <class>"; styles: `{}` is "<token>".
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a {}",
        "a {} on a black background",
        "a {} on a white background",
        "a {} on a gray background",
        "a {}, top left",
        "a {}, top right",
        "a {}, bottom left",
        "a {}, bottom right",
        "a {}, in the center",
        "a small {}",
        "a large {}",
        "a {} on a black background, top left",
        "a {} on a white background, bottom right",
        "a {} on a gray background, in the center",
        "a small {} on a white background",
        "a large {} on a gray background",
        "a small {} on a black background, top right",
        "a large {} on a white background, bottom left",
        "a {} on a gray background, top left",
        "a large {} on a black background, in the center",
    ),
    "style": (
        "a circle in the style of {}",
        "a star in the style of {}",
        "a red circle in the style of {}",
        "a blue square in the style of {}",
        "a green triangle in the style of {}",
        "a yellow diamond in the style of {}",
        "a purple star in the style of {}",
        "a red ring in the style of {}",
        "a blue circle on a black background in the style of {}",
        "a green square on a white background in the style of {}",
        "a yellow star on a gray background in the style of {}",
        "a purple ring on a black background in the style of {}",
        "a red triangle on a white background in the style of {}",
        "a blue diamond on a gray background in the style of {}",
        "a green circle, top left, in the style of {}",
        "a yellow square, bottom right, in the style of {}",
        "a purple diamond, in the center, in the style of {}",
        "a red star on a gray background, top right, in the style of {}",
        "a blue ring on a white background, bottom left, in the style of {}",
        "a green star on a black background, in the center, in the style of {}",
    ),
}


def concept_appearances() -> frozenset[tuple[str | None, str | None, str | None, str | None]]:
    """The object concepts' looks, which pretraining data must never contain."""
    return frozenset(c.appearance for c in CONCEPTS if c.kind == "object")


def tuning_appearances() -> frozenset[tuple[str | None, str | None, str | None, str | None]]:
    """The tuning concepts' object looks, which the base model's pretraining pictures must never contain either.
    (Kept apart from `concept_appearances`, which the VAE's and evaluator's pictures exclude too: adding them there
    would change what a rebuild of the shipped world draws.)"""
    return frozenset(c.appearance for c in TUNING_CONCEPTS if c.kind == "object")


def get_concept(name: str) -> WorldConcept:
    """A world concept by name, the tuning-only ones included."""
    for c in CONCEPTS + TUNING_CONCEPTS:
        if c.name == name:
            return c
    raise Fl2tError(
        f"no world concept named {name!r}; the world's concepts are: {', '.join(c.name for c in CONCEPTS)} "
        f"(and, for tuning only: {', '.join(c.name for c in TUNING_CONCEPTS)})"
    )


def reference_scenes(concept: WorldConcept, n: int = REFERENCES_PER_CONCEPT) -> list[Scene]:
    """The concept's reference pictures: fixed by the world's seed and the concept's place in CONCEPTS (the tuning
    concepts' places follow), their backgrounds cycling black, white, gray, as a user's photos of a pet in several
    rooms (world v2; v1's drew each at random: dottri's were four white and one black, bullseye's never gray)."""
    rng = np.random.default_rng([CONCEPT_SEED, (CONCEPTS + TUNING_CONCEPTS).index(concept)])
    backgrounds = list(BACKGROUNDS)
    return [replace(concept.scene(rng), background=backgrounds[i % len(backgrounds)]) for i in range(n)]


def pair_reference_scenes(concept: WorldConcept, n: int) -> list[tuple[PairScene, str]]:
    """An object concept's pictures at a two-object scene's size (an experiment's references, none by default): the
    concept beside a plain object of another shape and other colours, on the left or the right, as a photo of a pet
    shows it beside a chair; with their captions ('a <c-stripestar> star to the left of a blue ring on a black
    background'). Drawn from their own stream, so the single-object references do not change."""
    if concept.kind != "object":
        raise Fl2tError(f"{concept.name} is a style: only an object concept has pictures beside another object")
    rng = np.random.default_rng([CONCEPT_SEED, (CONCEPTS + TUNING_CONCEPTS).index(concept), 2])
    own = Scene(concept.shape, concept.colour, "black", "in the center", "small", concept.pattern, concept.colour2)
    shapes = [s for s in SHAPES if s != concept.shape]
    colours = [c for c in COLOURS if c not in (concept.colour, concept.colour2)]
    out = []
    for i in range(n):
        shape, colour = shapes[rng.integers(len(shapes))], colours[rng.integers(len(colours))]
        plain = replace(own, shape=shape, colour=colour, pattern=None, colour2=None)
        bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        left_first = i % 2 == 0
        pair = PairScene(
            own if left_first else plain, plain if left_first else own, bg, jitter=int(rng.integers(2**31))
        )
        a, b = (concept.subject, object_phrase(plain, False))[:: 1 if left_first else -1]
        out.append((pair, f"a {a} to the left of a {b} on a {bg} background"))
    return out


def write_concept(
    concept: WorldConcept,
    out_dir: Path,
    side: int | None = None,
    pair_references: int = 0,
    scenes: Sequence[Scene] | None = None,
) -> Path:
    """Write one concept folder: NN.png, NN.txt (caption with the token) and concept.yaml. The pictures are
    `side` px (default: the shipped world's picture side); `pair_references` more pictures of an object concept
    beside another object follow the single-object ones (`pair_reference_scenes`; an experiment, 0 by default).
    `scenes`: other single-object pictures than `reference_scenes` (an experiment's)."""
    from fl2t.world import picture_side

    side = side or picture_side()
    folder = Path(out_dir) / concept.name
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(reference_scenes(concept) if scenes is None else scenes):
        render(scene, side).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(concept.caption(scene, i) + "\n")
    if pair_references and concept.kind == "object":
        for i, (pair, text) in enumerate(pair_reference_scenes(concept, pair_references), REFERENCES_PER_CONCEPT):
            render_pair(pair, side).save(folder / f"{i:02d}.png")
            (folder / f"{i:02d}.txt").write_text(text + "\n")
    (folder / "concept.yaml").write_text(
        f"name: {concept.name}\ntokens: ['{concept.token}']\nclass_word: {concept.class_word}\nkind: {concept.kind}\n"
    )
    return folder


def write_concepts(out_dir: str | Path, side: int | None = None) -> list[Path]:
    """Write every world concept's folder under `out_dir` (pictures `side` px, default the shipped world's); returns
    the folders in CONCEPTS order."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Fl2tError(f"{out} is a file; give a directory to write the concept folders into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fl2tError(f"cannot create {out}: {e.strerror}; choose a writable directory") from e
    return [write_concept(c, out, side) for c in CONCEPTS]
