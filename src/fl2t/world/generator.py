"""The tiny world's pictures: one object (shape, colour, size, position, optional pattern) on a plain
background, drawn at 32x32 with anti-aliased edges, and the caption that says what is in it.

Colours are few and far apart in RGB, shapes are large (radius >= 8 px), because the tiny base model's
hardest job is binding the right colour to the object (issue 3, measured facts).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down, for smooth edges

SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring")
# Object colours: five hues far apart; backgrounds: three greys, never an object colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (45, 75, 235),
    "yellow": (240, 215, 35),
    "purple": (160, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (125, 125, 125),
}
# Phrase -> centre as a fraction of the free range (0 = as far left/up as the object fits).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.0, 0.0),
    "top right": (1.0, 0.0),
    "bottom left": (0.0, 1.0),
    "bottom right": (1.0, 1.0),
    "in the center": (0.5, 0.5),
}
SIZES: dict[str, float] = {"small": 8.0, "large": 10.5}  # radius in pixels at SIZE=32
# Two-colour patterns (the second colour inside the object) and renderings of a whole picture.
PATTERNS = ("striped", "checkered", "dotted", "split", "bullseye", "centre-dot", "crossed")
PATTERN_WORDS = {
    "striped": "{c} and {c2} striped",
    "checkered": "{c} and {c2} checkered",
    "dotted": "{c} {c2}-dotted",
    "split": "half {c} half {c2}",
    "bullseye": "{c} and {c2} bullseye",
    "centre-dot": "{c} {c2}-centred",
    "crossed": "{c} {c2}-crossed",
}
STYLES = ("outline", "pastel", "mosaic")
STYLE_WORDS = {"outline": "outlined", "pastel": "pastel", "mosaic": "pixelated"}
# Two patterns and a rendering that only the tuning concepts have (fl2t.world.concepts.TUNING_CONCEPTS):
# `random_scene` draws from PATTERNS and STYLES alone, so no pretraining picture shows them. They have no caption
# words (PATTERN_WORDS, STYLE_WORDS name what the world's vocabulary holds): a concept's caption names its token.
TUNING_PATTERNS = ("quartered", "banded")
TUNING_STYLES = ("echo",)
PASTEL_BACKGROUND = (250, 236, 214)


@dataclass(frozen=True)
class Scene:
    """Everything a picture shows; `render` draws it and `caption` describes it."""

    shape: str
    colour: str
    background: str
    position: str
    size: str
    pattern: str | None = None  # one of PATTERNS (or TUNING_PATTERNS), drawn with `colour2`
    colour2: str | None = None
    style: str | None = None  # one of STYLES (or TUNING_STYLES): how the whole picture is rendered
    jitter: int = 0  # seed for small colour and placement jitter, so no two pictures are identical

    @property
    def combo(self) -> tuple[str, str, str, str]:
        """The prompt combination the base model's held-out gate is about."""
        return (self.shape, self.colour, self.background, self.position)


def _shape_mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """Boolean (n, n) mask of `shape` with centre (cx, cy) and radius r, in pixels of an n x n grid."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    if shape == "triangle":
        # Upward triangle: apex at (cx, cy - r), base at y = cy + 0.8 r.
        top, bottom = cy - r, cy + 0.8 * r
        half = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half)
    if shape == "star":
        # Five points: the radius swings between 0.45 r and r with the angle.
        ang = np.arctan2(dx, -dy)
        k = np.abs(((ang / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at a point, 0 between points
        rad = 0.45 * r + 0.55 * r * k**1.5
        return dx**2 + dy**2 <= rad**2
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """Boolean (n, n) mask of where the second colour shows inside the object."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    s = n / SIZE  # pixels of the grid per output pixel
    if pattern == "striped":
        return ((y - cy) // (3 * s)) % 2 == 0
    if pattern == "checkered":
        return (((x - cx) // (4 * s)) + ((y - cy) // (4 * s))) % 2 == 0
    if pattern == "dotted":
        fx, fy = ((x - cx) / (5 * s)) % 1.0 - 0.5, ((y - cy) / (5 * s)) % 1.0 - 0.5
        return fx**2 + fy**2 <= 0.3**2
    if pattern == "split":
        return (x - cx) + (y - cy) > 0
    if pattern == "bullseye":
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return ((d // (0.34 * r)) % 2) == 1
    if pattern == "centre-dot":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (0.3 * r) ** 2
    if pattern == "crossed":
        return (np.abs(x - cx) <= 0.22 * r) | (np.abs(y - cy) <= 0.22 * r)
    if pattern == "quartered":  # the top-left and bottom-right quarters
        return (x - cx) * (y - cy) > 0
    if pattern == "banded":  # a band across the middle
        return np.abs(y - cy) <= 0.3 * r
    raise ValueError(f"unknown pattern {pattern!r}")


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of `mask` within `width` grid pixels of its edge."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as a SIZE x SIZE RGB image. Pure function of the scene (jitter included)."""
    rng = np.random.default_rng(scene.jitter)
    n = SIZE * SUPERSAMPLE
    r = SIZES[scene.size] * (1 + rng.uniform(-0.06, 0.06))
    fx, fy = POSITIONS[scene.position]
    lo, hi = r + 1.0, SIZE - r - 1.0  # keep the object inside the picture
    cx = lo + fx * (hi - lo) + rng.uniform(-1.0, 1.0)
    cy = lo + fy * (hi - lo) + rng.uniform(-1.0, 1.0)
    cx, cy, rs = cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE

    def tint(rgb: tuple[int, int, int]) -> np.ndarray:
        return np.clip(np.array(rgb, np.float32) + rng.uniform(-10, 10, 3), 0, 255)

    # Backgrounds stay grey: one brightness jitter for all three channels.
    bg = np.clip(np.array(BACKGROUNDS[scene.background], np.float32) + rng.uniform(-10, 10), 0, 255)
    c1 = tint(COLOURS[scene.colour])
    c2 = tint(COLOURS[scene.colour2]) if scene.colour2 else c1
    if scene.style == "pastel":
        # A palette: every colour half-way to white, the background always cream.
        bg = np.array(PASTEL_BACKGROUND, np.float32)
        c1, c2 = 0.5 * c1 + 127.5, 0.5 * c2 + 127.5

    mask = _shape_mask(scene.shape, cx, cy, rs, n)
    if scene.style == "outline":
        mask = _outline(mask, width=int(1.6 * SUPERSAMPLE))
    img = np.broadcast_to(bg, (n, n, 3)).copy()
    if scene.style == "echo":
        # A faded copy of the object (half-way to the background) 3 pixels down and right, behind it.
        d = 3 * SUPERSAMPLE
        img[_shape_mask(scene.shape, cx + d, cy + d, rs, n)] = 0.5 * (bg + c1)
    img[mask] = c1
    if scene.pattern:
        second = _pattern_mask(scene.pattern, cx, cy, rs, n)
        if scene.pattern != "centre-dot":  # a centre dot also fills a ring's hole
            second &= mask
        img[second] = c2
    # (n, n, 3) -> (SIZE, SIZE, 3): average each SUPERSAMPLE x SUPERSAMPLE block.
    img = img.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    if scene.style == "mosaic":
        # 4x4-pixel blocks, each the mean colour of its block.
        b = 4
        img = img.reshape(SIZE // b, b, SIZE // b, b, 3).mean(axis=(1, 3))
        img = img.repeat(b, axis=0).repeat(b, axis=1)
    return Image.fromarray(np.round(img).astype(np.uint8), "RGB")


def object_phrase(scene: Scene, with_size: bool = True) -> str:
    """'small red and yellow striped star', 'large blue ring', 'outlined green circle'."""
    words = []
    if with_size:
        words.append(scene.size)
    if scene.style and scene.style in STYLE_WORDS:
        words.append(STYLE_WORDS[scene.style])
    if scene.pattern:
        words.append(PATTERN_WORDS[scene.pattern].format(c=scene.colour, c2=scene.colour2))
    else:
        words.append(scene.colour)
    words.append(scene.shape)
    return " ".join(words)


def caption(scene: Scene, with_size: bool = True, with_background: bool = True, with_position: bool = True) -> str:
    """'a small red ring on a blue background, top left' (parts can be left out)."""
    text = "a " + object_phrase(scene, with_size)
    if with_background and scene.style != "pastel":  # the pastel palette replaces the background
        text += f" on a {scene.background} background"
    if with_position:
        text += f", {scene.position}"
    return text


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption with size, background or position sometimes left out, as people write them."""
    return caption(
        scene,
        with_size=rng.random() < 0.6,
        with_background=rng.random() < 0.85,
        with_position=rng.random() < 0.8,
    )


def all_combos() -> list[tuple[str, str, str, str]]:
    """Every (shape, colour, background, position) combination, in a fixed order."""
    return [(s, c, b, p) for s in SHAPES for c in COLOURS for b in BACKGROUNDS for p in POSITIONS]


def is_held_out(combo: tuple[str, str, str, str]) -> bool:
    """About a quarter of the combinations never appear in pretraining: the base model's gate prompts them.

    Decided by a hash of the words, so it is the same on every machine and in every order.
    """
    h = hashlib.sha256("|".join(combo).encode()).digest()
    return h[0] % 4 == 0


def held_out_combos() -> list[tuple[str, str, str, str]]:
    return [c for c in all_combos() if is_held_out(c)]


def random_scene(
    rng: np.random.Generator,
    rich: bool = False,
    held_out: bool | None = False,
    styles: bool = True,
    exclude: frozenset[tuple[str, str | None, str | None, str | None]] = frozenset(),
) -> Scene:
    """One random scene. `rich` adds two-colour patterns and (with `styles`) renderings.

    held_out: False draws only pretraining combinations, True only held-out ones, None any.
    exclude: (shape, pattern, colour, colour2) appearances never to draw (the concepts' own looks).
    """
    colours = list(COLOURS)
    while True:
        scene = Scene(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=colours[rng.integers(len(colours))],
            background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
            position=list(POSITIONS)[rng.integers(len(POSITIONS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            jitter=int(rng.integers(2**31)),
        )
        if rich:
            u = rng.random()
            if u < 0.35:
                c2 = colours[rng.integers(len(colours))]
                if c2 != scene.colour:
                    scene = replace(scene, pattern=PATTERNS[rng.integers(len(PATTERNS))], colour2=c2)
            elif u < 0.55 and styles:
                scene = replace(scene, style=STYLES[rng.integers(len(STYLES))])
        if held_out is not None and is_held_out(scene.combo) != held_out:
            continue
        if (scene.shape, scene.pattern, scene.colour, scene.colour2) in exclude:
            continue
        return scene


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Images -> float32 (N, 3, SIZE, SIZE) in [-1, 1], the layout diffusers and CLIP take."""
    a = np.stack([np.asarray(im, np.float32) for im in images])  # (N, H, W, 3)
    return (a.transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)
