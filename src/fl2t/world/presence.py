"""Is each named world concept in a picture? A multi-concept presence score for the tiny world (issue 14 item 2).

A picture of two concepts holds either two object concepts side by side (as `render_pair` draws them: one object per
half, radius PAIR_RADIUS) or one object concept rendered in a style concept; a generated picture may hold anything.
`Presence(evaluator)(images, names)` answers, per picture and per named concept, present or not.

The method is nearest references in the evaluator's image embedding, against references drawn fresh from the world
(never the pictures judged), because the world can render any look on demand and a nearest-reference rule needs no
threshold to tune:

- Objects. A picture is cut into candidate crops: its left half, its right half, and the whole of it unless its
  object region falls apart into a left and a right part (a pair: a box round two objects looks like no reference,
  and its nearest reference is then any look, measured as false finds). Each crop is normalised: the object region
  (the pixels that differ from the background colour, estimated as the median of the crop's border) is cut to its
  bounding box with a margin, scaled up (bilinear) to about the size of a single-object picture's object and pasted
  centred on a 32 x 32 canvas of the background colour, so a pair's small object and a single object look alike to
  the evaluator, whose pictures were single objects. A bank of references goes through the same normalisation: every
  object concept (half at pair size, half at single size), and the looks it must be told apart from: a plain object
  of every (shape, colour) (each concept's own plain look, its hardest distractor, as many as the concept's), and
  patterned objects of the concepts' shapes in other patterns and colours. An object concept is present if, for some
  crop, most of the crop's K nearest references are the concept (K = 3: one stray neighbour does not decide). Where
  one style concept is named too, the bank is rendered in that style (an outlined crossbox is compared with outlined
  references, not plain ones).
- Styles. The picture against a bank of the same content (the named object concepts, or random objects where none
  is named) rendered in every style concept, every generic style, the tuning style, and plainly; in two views, the
  whole picture and its normalised crop (`Presence.styles_found` says why both). A style concept is present if the
  single nearest reference in either view is in that style.

What it cannot see (`validation` measures it; tools/world_presence_validate.py prints it): outline keeps only a
1.6-pixel band of an object, so an outlined bullseye and an outlined plain purple circle differ by a few pixels of
the rings at the band's edge; mosaic's 4 x 4 blocks average a checkered diamond towards a plain one; and an object
concept rendered in a style that is not named is judged against plain references.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from fl2t.world.concepts import CONCEPTS, TUNING_CONCEPTS, WorldConcept, get_concept
from fl2t.world.generator import (
    BACKGROUNDS,
    COLOURS,
    GENERIC_STYLES,
    PATTERNS,
    SHAPES,
    SIZE,
    STYLES,
    TUNING_STYLES,
    PairScene,
    Scene,
    random_scene,
    render,
    render_pair,
)

K = 3  # an object concept is present where most of a crop's K nearest references are the concept
OBJECT_SIDE = 20  # pixels: a normalised crop's longer side (a single-object picture's object, radius 8-10.5, + margin)
MARGIN = 1  # pixels of background kept around the object region's bounding box
THRESHOLD = 40.0  # a pixel is the object's where a channel differs from the background by more than this
PLAIN = "plain"  # the style label of a picture rendered with no style
VALIDATION_SEED = 20260514  # the validation's pictures; the banks are drawn from `Presence.seed`, so never the same


class ImageEmbedder(Protocol):
    """What the score needs of an evaluator: `fl2t.metrics.ClipEvaluator` (the world may not import it)."""

    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


def normalise(crop: Image.Image) -> Image.Image:
    """The crop's object region (pixels unlike the border's median colour), cut to its bounding box with MARGIN,
    scaled (bilinear) to OBJECT_SIDE on its longer side and pasted centred on a SIZE x SIZE background canvas.
    A crop with no object region is the empty canvas."""
    a = np.asarray(crop.convert("RGB"), np.float32)
    bg = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    canvas = Image.new("RGB", (SIZE, SIZE), tuple(int(round(v)) for v in bg))
    ys, xs = np.nonzero(_region(a))
    if len(ys) == 0:
        return canvas
    y0, y1 = max(ys.min() - MARGIN, 0), min(ys.max() + MARGIN + 1, a.shape[0])
    x0, x1 = max(xs.min() - MARGIN, 0), min(xs.max() + MARGIN + 1, a.shape[1])
    h, w = y1 - y0, x1 - x0
    scale = OBJECT_SIDE / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    obj = Image.fromarray(np.round(a[y0:y1, x0:x1]).astype(np.uint8), "RGB").resize((nw, nh), Image.BILINEAR)
    canvas.paste(obj, ((SIZE - nw) // 2, (SIZE - nh) // 2))
    return canvas


def _region(a: np.ndarray) -> np.ndarray:
    """Boolean (H, W): the pixels of `a` (H, W, 3) unlike the median colour of its border (the background)."""
    bg = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    return np.abs(a - bg).max(axis=-1) > THRESHOLD


def side_by_side(image: Image.Image) -> bool:
    """Whether the picture's object region falls apart into a left and a right part (an empty column between)."""
    cols = np.nonzero(_region(np.asarray(image.convert("RGB"), np.float32)).any(axis=0))[0]
    return len(cols) > 0 and bool((np.diff(cols) > 1).any())


def crops(image: Image.Image) -> list[Image.Image]:
    """The candidate crops an object is looked for in, normalised: the left half, the right half, and the whole
    picture unless it holds objects side by side (their bounding box would hold two objects: no reference looks
    like that, and the nearest of the references is then any of them)."""
    im = image.convert("RGB")
    if im.size != (SIZE, SIZE):
        im = im.resize((SIZE, SIZE), Image.BILINEAR)
    half = SIZE // 2
    parts = [im.crop((0, 0, half, SIZE)), im.crop((half, 0, SIZE, SIZE))]
    return [normalise(c) for c in parts + ([] if side_by_side(im) else [im])]


def _objects() -> tuple[WorldConcept, ...]:
    return tuple(c for c in CONCEPTS + TUNING_CONCEPTS if c.kind == "object")


def _look(shape: str, colour: str, pattern: str | None = None, colour2: str | None = None) -> Scene:
    return Scene(shape, colour, "black", "in the center", "small", pattern=pattern, colour2=colour2)


def _single(obj: Scene, rng: np.random.Generator, style: str | None) -> Image.Image:
    """`obj`'s look drawn as a single-object picture: random background, position and size."""
    scene = random_scene(rng, held_out=None)
    look = dict(shape=obj.shape, colour=obj.colour, pattern=obj.pattern, colour2=obj.colour2)
    return render(replace(scene, **look, style=style))


def _pair(obj: Scene, rng: np.random.Generator) -> Image.Image:
    """`obj`'s look drawn at pair size, on a random side next to a random plain object."""
    other = _look(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    left = rng.random() < 0.5
    pair = PairScene(obj if left else other, other if left else obj, background, jitter=int(rng.integers(2**31)))
    return crops(render_pair(pair))[0 if left else 1]


class Presence:
    """`Presence(evaluator)(images, names)`: (N, len(names)) bool, is each named world concept in each picture.

    The reference banks are drawn from `seed` on first use and kept (one object bank per style, one style bank per
    content): the score is a pure function of the evaluator, the seed and the pictures.
    bank_size: references per label (each object concept, each style); the distractor looks get a quarter of it.
    """

    def __init__(self, evaluator: ImageEmbedder, seed: int = 0, bank_size: int = 32) -> None:
        self.evaluator = evaluator
        self.seed = seed
        self.bank_size = bank_size
        self._object_banks: dict[str | None, tuple[torch.Tensor, list[str]]] = {}
        self._style_banks: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, list[str]]] = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def object_bank(self, style: str | None) -> tuple[torch.Tensor, list[str]]:
        """(M, D) normalised-crop embeddings and their labels (an object concept's name, or a distractor's look),
        every picture rendered in `style` (None: plainly, with half the concepts' references at pair size)."""
        if style not in self._object_banks:
            rng = self._rng(1, ([None, *STYLES, *TUNING_STYLES, *GENERIC_STYLES]).index(style))
            images: list[Image.Image] = []
            labels: list[str] = []

            def add(label: str, obj: Scene, n: int) -> None:
                for i in range(n):
                    pair = style is None and i % 2 == 1
                    images.append(_pair(obj, rng) if pair else normalise(_single(obj, rng, style)))
                    labels.append(label)

            concepts = _objects()
            for c in concepts:
                add(c.name, _look(c.shape, c.colour, c.pattern, c.colour2), self.bank_size)
            few = max(2, self.bank_size // 4)
            hardest = {(c.shape, c.colour) for c in concepts}  # a concept's plain look: as many as the concept's
            for shape in SHAPES:
                for colour in COLOURS:
                    add(
                        f"{colour} {shape}", _look(shape, colour), self.bank_size if (shape, colour) in hardest else few
                    )
            looks = {c.appearance for c in concepts}
            colours = list(COLOURS)
            for shape in sorted({c.shape for c in concepts}):
                for pattern in PATTERNS:
                    while True:
                        c1, c2 = rng.choice(len(colours), 2, replace=False)
                        if (shape, pattern, colours[c1], colours[c2]) not in looks:
                            break
                    add(
                        f"{colours[c1]} {colours[c2]} {pattern} {shape}",
                        _look(shape, colours[c1], pattern, colours[c2]),
                        few,
                    )
            self._object_banks[style] = (self.evaluator.image_embeds(images), labels)
        return self._object_banks[style]

    def style_bank(self, content: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The object concepts named in `content` (random objects where it is empty) rendered in every style and
        plainly: (M, D) whole-picture embeddings, (M, D) normalised-crop embeddings, and their labels (a style or
        PLAIN)."""
        if content not in self._style_banks:
            rng = self._rng(2, *(_objects().index(get_concept(n)) for n in content))
            draw: Callable[[], Scene]
            if content:
                concepts = [get_concept(n) for n in content]
                draw = lambda: concepts[rng.integers(len(concepts))].scene(rng)  # noqa: E731
            else:
                draw = lambda: random_scene(rng, rich=True, held_out=None, styles=False)  # noqa: E731
            images, labels = [], []
            for style in (None, *STYLES, *TUNING_STYLES, *GENERIC_STYLES):
                for _ in range(self.bank_size):
                    images.append(render(replace(draw(), style=style)))
                    labels.append(style or PLAIN)
            embeds = self.evaluator.image_embeds(images), self.evaluator.image_embeds([normalise(im) for im in images])
            self._style_banks[content] = (*embeds, labels)
        return self._style_banks[content]

    def styles_found(self, images: Sequence[Image.Image], content: tuple[str, ...]) -> list[set[str]]:
        """Per picture, the styles (or PLAIN) of its nearest reference in the whole-picture view and in the
        normalised-crop view. Two views, because each misses one style: outline's thin band is a few pixels of a
        whole picture, and normalising blows an object up to fill the picture; mosaic's 4-pixel blocks are what
        normalising's rescaling blurs away."""
        whole, crop, labels = self.style_bank(content)
        a = (self.evaluator.image_embeds(list(images)) @ whole.T).argmax(dim=1)
        b = (self.evaluator.image_embeds([normalise(im) for im in images]) @ crop.T).argmax(dim=1)
        return [{labels[int(i)], labels[int(j)]} for i, j in zip(a, b)]

    def __call__(self, images: Sequence[Image.Image], names: Sequence[str]) -> np.ndarray:
        """(N, len(names)) bool: is each named world concept in each picture?"""
        concepts = [get_concept(n) for n in names]  # an unknown name is an Fl2tError naming the world's concepts
        out = np.zeros((len(images), len(concepts)), dtype=bool)
        if not images or not concepts:
            return out
        objects = [c.name for c in concepts if c.kind == "object"]
        styles = {c.style for c in concepts if c.kind == "style"}
        if objects:
            bank, labels = self.object_bank(next(iter(styles)) if len(styles) == 1 else None)
            found = self.objects_found(images, bank, labels)
            for j, c in enumerate(concepts):
                if c.kind == "object":
                    out[:, j] = [c.name in f for f in found]
        if styles:
            found = self.styles_found(images, tuple(dict.fromkeys(objects)))
            for j, c in enumerate(concepts):
                if c.kind == "style":
                    out[:, j] = [c.style in f for f in found]
        return out

    def nearest(self, images: Sequence[Image.Image], bank: torch.Tensor, labels: list[str]) -> list[list[list[str]]]:
        """Per picture, per candidate crop, the labels of its K nearest references in `bank`."""
        cands = [crops(im) for im in images]
        emb = self.evaluator.image_embeds([c for cs in cands for c in cs])
        top = [[labels[int(k)] for k in row] for row in (emb @ bank.T).topk(K, dim=1).indices]
        out, i = [], 0
        for cs in cands:
            out.append(top[i : i + len(cs)])
            i += len(cs)
        return out

    def objects_found(self, images: Sequence[Image.Image], bank: torch.Tensor, labels: list[str]) -> list[set[str]]:
        """Per picture, the labels that win the K-nearest majority in some crop."""
        found: list[set[str]] = []
        for per_crop in self.nearest(images, bank, labels):
            winners = set()
            for votes in per_crop:
                best = max(set(votes), key=votes.count)
                if votes.count(best) > K // 2:
                    winners.add(best)
            found.append(winners)
        return found


def _plain(obj: Scene) -> Scene:
    return replace(obj, pattern=None, colour2=None)


def validation(
    evaluator: ImageEmbedder, seeds: int = 3, style_seeds: int = 6, presence: Presence | None = None
) -> dict:
    """Presence measured on ground-truth renders drawn from VALIDATION_SEED (never a bank's): a dict of shares.

    pairs: every ordered pair of two different object concepts (PairScene, random background) x `seeds`:
      both (both found), left_absent / right_absent (that side replaced by a plain object of its shape and main
      colour: reported absent while the other is still found); per concept, its found and absent shares.
    styled: every object concept x style concept x `style_seeds`, `render(replace(c.scene(rng), style=s))`:
      both (both found); object_absent (the object replaced by a plain one of its shape and colour, in the style);
      style_absent (the same picture rendered plainly); per concept and per style. A combination whose picture
      equals, pixel for pixel, its picture with the plain object (bullseye in outline: the outline keeps none of
      the yellow rings) shows no concept to find and is left out, counted in `styled/invisible`.
    """
    presence = presence or Presence(evaluator)
    objects = [c for c in CONCEPTS if c.kind == "object"]
    styles = [c for c in CONCEPTS if c.kind == "style"]
    look = {c.name: _look(c.shape, c.colour, c.pattern, c.colour2) for c in objects}
    rng = np.random.default_rng(VALIDATION_SEED)
    rows: list[tuple[str, str, PairScene]] = []
    for a in objects:
        for b in objects:
            if a is not b:
                for _ in range(seeds):
                    bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
                    rows.append((a.name, b.name, PairScene(look[a.name], look[b.name], bg, int(rng.integers(2**31)))))
    tally: dict[str, list[bool]] = {}

    def count(key: str, ok: bool) -> None:
        tally.setdefault(key, []).append(bool(ok))

    for a, b, pair in rows:
        got = presence([render_pair(pair)], [a, b])[0]
        count("pairs/both", got.all())
        count(f"pairs/found/{a}", got[0])
        count(f"pairs/found/{b}", got[1])
        for side, gone, kept in (("left", a, b), ("right", b, a)):
            swapped = replace(pair, **{side: _plain(getattr(pair, side))})
            got = presence([render_pair(swapped)], [gone, kept])[0]
            ok = (not got[0]) and got[1]
            count(f"pairs/{side}_absent", ok)
            count(f"pairs/absent/{gone}", not got[0])
    for c in objects:
        for s in styles:
            for _ in range(style_seeds):
                scene = replace(c.scene(rng), style=s.style)
                images = [render(scene), render(_plain(scene)), render(replace(scene, style=None))]
                if images[0].tobytes() == images[1].tobytes():
                    count("styled/invisible", True)
                    continue
                got = presence(images, [c.name, s.name])
                count("styled/both", got[0].all())
                count(f"styled/found/{c.name}", got[0, 0])
                count(f"styled/found/{s.name}", got[0, 1])
                count("styled/object_absent", not got[1, 0])
                count(f"styled/object_absent/{s.name}", not got[1, 0])
                count(f"styled/object_absent/{c.name}+{s.name}", not got[1, 0])
                count("styled/style_absent", not got[2, 1])
                count(f"styled/style_absent/{s.name}", not got[2, 1])
    return {k: float(np.mean(v)) for k, v in tally.items()} | {f"n/{k}": len(v) for k, v in tally.items()}
