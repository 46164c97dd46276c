"""The tiny world's pictures: one object (shape, colour, size, position, optional pattern) on a plain
background, drawn at 32x32 (or any side, every length scaled) with anti-aliased edges, and the caption that says
what is in it; world v2 adds generic renderings ("..., in the style of neon") and two-object scenes ("a red star to
the left of a blue ring on a black background", `PairScene`).

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
# Generic renderings (world v2), captioned "..., in the style of <word>" as a style concept is: the base model learns
# that this slot of a caption changes the whole rendering, so a style concept is a shift of a kind it has seen (as
# SD has seen painting styles). None is a style concept's rendering (outline, pastel, mosaic) nor a tuning one's, and
# each keeps what the rest of its caption says true (inverted, which turned the named red into cyan, and chunky, 2 x 2
# blocks the 32 px VAE does not carry, were replaced by gradient and framed in the twentieth session: docs/world.md).
# Blocky (the twenty-second session) gives the base a pixelation, as SD knows pixel art: without one, mosaic's experts
# drew mottled textures instead of its blocks.
GENERIC_STYLES = ("neon", "sketchy", "gradient", "blurry", "faded", "framed", "blocky")
PAIR_RADIUS = 6.5  # radius in pixels of each object of a two-object scene (one per half of the picture)
NEON_BACKGROUND = (10, 10, 10)


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
    s = n / SIZE  # pixels of the grid per pixel of a SIZE-px picture
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


def render(scene: Scene, side: int = SIZE) -> Image.Image:
    """Draw `scene` as a `side` x `side` RGB image. Pure function of the scene (jitter included) and the side.

    Every length (radius, jitter, pattern period, outline, blocks) is given for a SIZE-px picture and scaled by
    side / SIZE, so a larger world's picture is the same picture at a finer resolution (a 48 px world v2 was tried)."""
    rng = np.random.default_rng(scene.jitter)
    k = side / SIZE
    n = side * SUPERSAMPLE
    r = SIZES[scene.size] * (1 + rng.uniform(-0.06, 0.06))
    fx, fy = POSITIONS[scene.position]
    lo, hi = r + 1.0, SIZE - r - 1.0  # keep the object inside the picture
    cx = lo + fx * (hi - lo) + rng.uniform(-1.0, 1.0)
    cy = lo + fy * (hi - lo) + rng.uniform(-1.0, 1.0)
    cx, cy, rs = cx * k * SUPERSAMPLE, cy * k * SUPERSAMPLE, r * k * SUPERSAMPLE

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

    if scene.style == "neon":
        bg = np.array(NEON_BACKGROUND, np.float32)
    img = _background(bg, n, scene.style)
    _paint(img, scene, cx, cy, rs, c1, c2, k)
    return _finish(_downsample(img), scene.style, bg, k)


def _background(bg: np.ndarray, n: int, style: str | None) -> np.ndarray:
    """The n x n background before any object is drawn: plain, or for gradient the captioned grey at the top
    turning half-way towards white (dark and mid greys) or black (light ones) at the bottom."""
    img = np.broadcast_to(bg, (n, n, 3)).copy()
    if style == "gradient":
        far = 255.0 if bg.mean() < 160 else 0.0
        t = 0.5 * np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None, None]
        img = (1 - t) * img + t * far
    return img


def _paint(
    img: np.ndarray, obj: Scene, cx: float, cy: float, rs: float, c1: np.ndarray, c2: np.ndarray, k: float
) -> None:
    """Draw `obj`'s shape and pattern in its style on `img` (n x n at SUPERSAMPLE, the background already there),
    centred at (cx, cy) with radius rs in its pixels; `k` scales lengths (side / SIZE)."""
    n, bg = img.shape[0], img[0, 0].copy()  # echo's faded copy mixes with it (an echo picture's background is plain)
    mask = _shape_mask(obj.shape, cx, cy, rs, n)
    if obj.style == "outline":
        mask = _outline(mask, width=int(1.6 * SUPERSAMPLE * k))
    second = None
    if obj.pattern:
        second = _pattern_mask(obj.pattern, cx, cy, rs, n)
        if obj.pattern != "centre-dot" or obj.style in GENERIC_STYLES:  # a centre dot also fills a ring's hole
            second &= mask
    if obj.style == "neon":  # a dim fill inside a bright, whitened edge on near-black
        edge = _outline(mask, width=round(SUPERSAMPLE * k))
        img[mask] = 0.35 * c1
        if second is not None:
            img[second & ~edge] = 0.35 * c2
        img[edge] = 0.6 * c1 + 0.4 * 255
        return
    if obj.style == "sketchy":  # a thin edge and diagonal hatching, the background showing between
        y, x = np.mgrid[0:n, 0:n]
        hatch = ((x + y) // round(SUPERSAMPLE * k)) % 3 == 0
        mask = (mask & hatch) | _outline(mask, width=round((SUPERSAMPLE // 2 + 1) * k))
        if second is not None:
            second &= mask
    if obj.style == "echo":
        # A faded copy of the object (half-way to the background) 3 pixels down and right, behind it.
        d = round(3 * SUPERSAMPLE * k)
        img[_shape_mask(obj.shape, cx + d, cy + d, rs, n)] = 0.5 * (bg + c1)
    img[mask] = c1
    if second is not None:
        img[second] = c2


def _finish(out: np.ndarray, style: str | None, background: np.ndarray, k: float) -> Image.Image:
    """The renderings of the whole picture, on the downsampled (side, side, 3) picture; `background`: its colour."""
    if style == "mosaic":  # 4x4-pixel blocks (at SIZE px), each the mean colour of its block
        out = _blocks(out, round(4 * k))
    elif style == "blocky":  # 8 x 4-pixel cells (at SIZE px), twice as wide as mosaic's, each its cell's mean
        out = _blocks(out, round(4 * k), round(8 * k))
    elif style == "framed":  # a 2-pixel border (at SIZE px), light on dark and mid-grey backgrounds, dark on light
        w = round(2 * k)
        frame = 230.0 if background.mean() < 160 else 25.0
        out = out.copy()
        out[:w], out[-w:], out[:, :w], out[:, -w:] = frame, frame, frame, frame
    elif style == "blurry":  # two 3 x 3 box blurs at SIZE px (the same spread in SIZE-px units)
        for _ in range(round(2 * k * k)):
            out = _box_blur(out)
    elif style == "faded":  # low contrast, towards a light grey
        out = 0.4 * out + 0.6 * 170.0
    return Image.fromarray(np.round(np.clip(out, 0, 255)).astype(np.uint8), "RGB")


def _downsample(img: np.ndarray) -> np.ndarray:
    """(n, n, 3) -> (n / SUPERSAMPLE, n / SUPERSAMPLE, 3): the mean of each SUPERSAMPLE x SUPERSAMPLE block."""
    m = img.shape[0] // SUPERSAMPLE
    return img.reshape(m, SUPERSAMPLE, m, SUPERSAMPLE, 3).mean(axis=(1, 3))


def _blocks(img: np.ndarray, b: int, w: int | None = None) -> np.ndarray:
    """Each block of an (m, m, 3) picture, b tall and w wide (default b), filled with its mean colour."""
    m, w = img.shape[0], w or b
    img = img.reshape(m // b, b, m // w, w, 3).mean(axis=(1, 3))
    return img.repeat(b, axis=0).repeat(w, axis=1)


def _box_blur(img: np.ndarray) -> np.ndarray:
    """A 3 x 3 box blur with edge padding."""
    m = img.shape[0]
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(p[i : i + m, j : j + m] for i in range(3) for j in range(3)) / 9.0


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
    if scene.style in GENERIC_STYLES:
        text += f", in the style of {scene.style}"
    return text


def random_caption(scene: Scene | PairScene, rng: np.random.Generator, pairs_left_first: bool = False) -> str:
    """A caption with size, background or position sometimes left out, as people write them; a two-object scene's
    names its objects in either order, or always left first ("a red star to the left of a blue ring")."""
    if isinstance(scene, PairScene):
        left_first = rng.random() < 0.5
        return pair_caption(scene, left_first=left_first or pairs_left_first, with_background=rng.random() < 0.85)
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
    patterned: float = 0.35,
) -> Scene:
    """One random scene. `rich` adds two-colour patterns (drawn with probability `patterned`, kept when the second
    colour differs) and (with `styles`) renderings.

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
            if u < patterned:
                c2 = colours[rng.integers(len(colours))]
                if c2 != scene.colour:
                    scene = replace(scene, pattern=PATTERNS[rng.integers(len(PATTERNS))], colour2=c2)
            elif u < patterned + 0.2 and styles:
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


# ---------------------------------------------------------------- world v2: generic styles and two-object scenes


def is_held_out_style(style: str, shape: str) -> bool:
    """One shape per generic style (chosen by a hash of the style's word) is never drawn in that style in
    pretraining: the base model's style gate prompts these (a style it learned, on a shape it never saw in it)."""
    return SHAPES[hashlib.sha256(f"style|{style}".encode()).digest()[0] % len(SHAPES)] == shape


def styled_scene(
    rng: np.random.Generator,
    held_out: bool | None = False,
    patterned: float = 0.3,
    exclude: frozenset[tuple[str, str | None, str | None, str | None]] = frozenset(),
) -> Scene:
    """A random object in one of GENERIC_STYLES (30% two-colour patterned), position and background drawn as
    `random_scene` draws them. held_out: as `random_scene`, over the (style, shape) combinations; exclude: looks
    never to draw."""
    while True:
        scene = replace(random_scene(rng, held_out=None), style=GENERIC_STYLES[rng.integers(len(GENERIC_STYLES))])
        if rng.random() < patterned:
            c2 = list(COLOURS)[rng.integers(len(COLOURS))]
            if c2 != scene.colour:
                scene = replace(scene, pattern=PATTERNS[rng.integers(len(PATTERNS))], colour2=c2)
        if held_out is not None and is_held_out_style(scene.style, scene.shape) != held_out:
            continue
        if (scene.shape, scene.pattern, scene.colour, scene.colour2) not in exclude:
            return scene


@dataclass(frozen=True)
class PairScene:
    """Two objects side by side, one in each half of the picture, on one background. Each object is a `Scene`
    whose shape, colour and pattern are used (its size, position, background and style are not); `style` renders
    the whole picture, both objects alike (one of STYLES, GENERIC_STYLES or TUNING_STYLES; None: plain)."""

    left: Scene
    right: Scene
    background: str
    jitter: int = 0
    style: str | None = None

    @property
    def shapes(self) -> tuple[str, str]:
        return (self.left.shape, self.right.shape)


def pair_centres(jitter: int) -> tuple[tuple[float, float], tuple[float, float], float, float, np.random.Generator]:
    """The two objects' centres and radii in pixels of a SIZE-px picture, and the rng the colours are tinted with."""
    rng = np.random.default_rng(jitter)
    r1, r2 = (PAIR_RADIUS * (1 + rng.uniform(-0.06, 0.06)) for _ in range(2))
    lo = [r + 1.0 for r in (r1, r2)]
    hi = [SIZE - r - 1.0 for r in (r1, r2)]
    left = (SIZE / 4 + rng.uniform(-1.0, 1.0), rng.uniform(lo[0], hi[0]))
    right = (3 * SIZE / 4 + rng.uniform(-1.0, 1.0), rng.uniform(lo[1], hi[1]))
    return left, right, r1, r2, rng


def render_pair(pair: PairScene, side: int = SIZE) -> Image.Image:
    """Draw a two-object scene as a `side` x `side` RGB image (lengths scaled as `render` scales them). Pure
    function of the scene and the side."""
    k = side / SIZE
    n = side * SUPERSAMPLE
    left, right, r1, r2, rng = pair_centres(pair.jitter)
    bg = np.clip(np.array(BACKGROUNDS[pair.background], np.float32) + rng.uniform(-10, 10), 0, 255)
    if pair.style == "pastel":
        bg = np.array(PASTEL_BACKGROUND, np.float32)
    elif pair.style == "neon":
        bg = np.array(NEON_BACKGROUND, np.float32)
    img = _background(bg, n, pair.style)
    for obj, (cx, cy), r in ((pair.left, left, r1), (pair.right, right, r2)):
        c1 = np.clip(np.array(COLOURS[obj.colour], np.float32) + rng.uniform(-10, 10, 3), 0, 255)
        c2 = c1
        if obj.pattern:
            c2 = np.clip(np.array(COLOURS[obj.colour2], np.float32) + rng.uniform(-10, 10, 3), 0, 255)
        if pair.style == "pastel":
            c1, c2 = 0.5 * c1 + 127.5, 0.5 * c2 + 127.5
        cx, cy, rs = cx * k * SUPERSAMPLE, cy * k * SUPERSAMPLE, r * k * SUPERSAMPLE
        _paint(img, replace(obj, style=pair.style), cx, cy, rs, c1, c2, k)
    return _finish(_downsample(img), pair.style, bg, k)


def pair_caption(pair: PairScene, left_first: bool = True, with_background: bool = True) -> str:
    """'a red star to the left of a blue ring on a black background' (or the same scene named right-first)."""
    a, b = object_phrase(pair.left, with_size=False), object_phrase(pair.right, with_size=False)
    text = f"a {a} to the left of a {b}" if left_first else f"a {b} to the right of a {a}"
    return text + (f" on a {pair.background} background" if with_background else "")


def is_held_out_pair(left: str, right: str) -> bool:
    """About a third of the ordered (left shape, right shape) pairs never appear in pretraining: the base model's
    two-object gate prompts them."""
    return hashlib.sha256(f"pair|{left}|{right}".encode()).digest()[0] % 3 == 0


def held_out_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a in SHAPES for b in SHAPES if a != b and is_held_out_pair(a, b)]


def random_pair(
    rng: np.random.Generator,
    held_out: bool | None = False,
    patterned: float = 0.3,
    exclude: frozenset[tuple[str, str | None, str | None, str | None]] = frozenset(),
) -> PairScene:
    """Two different shapes in different colours, each two-colour patterned with probability `patterned`.
    held_out: as `random_scene`, over the (left shape, right shape) pairs; exclude: looks never to draw."""
    colours = list(COLOURS)
    while True:
        objs = []
        for _ in range(2):
            shape, colour = SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))]
            obj = Scene(shape=shape, colour=colour, background="black", position="in the center", size="small")
            if rng.random() < patterned:
                c2 = colours[rng.integers(len(colours))]
                if c2 != colour:
                    obj = replace(obj, pattern=PATTERNS[rng.integers(len(PATTERNS))], colour2=c2)
            objs.append(obj)
        pair = PairScene(
            objs[0], objs[1], list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], jitter=int(rng.integers(2**31))
        )
        a, b = pair.left, pair.right
        if a.shape == b.shape or a.colour == b.colour:
            continue
        if held_out is not None and is_held_out_pair(a.shape, b.shape) != held_out:
            continue
        if any((o.shape, o.pattern, o.colour, o.colour2) in exclude for o in (a, b)):
            continue
        return pair


def render_any(scene: Scene | PairScene, side: int = SIZE) -> Image.Image:
    return render_pair(scene, side) if isinstance(scene, PairScene) else render(scene, side)
