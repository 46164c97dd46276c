"""A concept on disk: a folder of reference images, optional captions and an optional concept.yaml.

Three layouts are read:
- plain: `<dir>/*.{jpg,png,webp}`, captions `<dir>/<stem>.txt`, optional `<dir>/concept.yaml`;
- CIFC/CIDM: `<root>/images/<concept>/` with captions in `<root>/caption/<concept>/<stem>.txt`;
- DreamBooth: `<root>/dataset/<subject>/` with classes in `<root>/dataset/prompts_and_classes.txt`.
Everything is decoded and checked here, before any training starts.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fl2t.data.templates import STABLE_TEMPLATE
from fl2t.errors import Fl2tError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # whole string (fullmatch): it names a folder
TOKEN_RE = re.compile(r"[^\s]{1,64}")
# What each concept.yaml key looks like, for error messages.
SPEC_EXAMPLES = {
    "name": "name: my-dog",
    "tokens": "tokens: ['<my-dog>']",
    "class_word": "class_word: dog",
    "kind": "kind: object (or style)",
}
# Images larger than this on their longer side are downscaled while loading.
MAX_SIDE = 2048

# The CIFC tasks of the CIDM release (PRIOR_ART.md): class words and kinds.
CIFC_CONCEPTS = {
    "dog": ("dog", "object"),
    "duck_toy": ("duck toy", "object"),
    "cat": ("cat", "object"),
    "backpack": ("backpack", "object"),
    "teddybear": ("teddy bear", "object"),
    "painting": ("painting", "style"),
    "dog2": ("dog", "object"),
    "drawing": ("drawing", "style"),
    "cat2": ("cat", "object"),
    "ink_painting": ("ink painting", "style"),
}


class ConceptSpec(BaseModel):
    """What `concept.yaml` holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    tokens: list[str]
    class_word: str
    kind: Literal["object", "style"] = "object"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                f"concept name {v!r} is not allowed: use 1-64 letters, digits, '_' or '-', starting with a letter or digit "
                "(set it with --name or name: in concept.yaml)"
            )
        return v

    @field_validator("tokens", mode="before")
    @classmethod
    def _one_token(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v  # tokens: <my-dog> means one token

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a concept needs at least one token, e.g. ['<c-dog>']")
        for t in v:
            if not TOKEN_RE.fullmatch(t) or any(unicodedata.category(c).startswith("C") for c in t):
                raise ValueError(f"token {t!r} is not allowed: one word without spaces or control characters")
        if len(set(v)) != len(v):
            raise ValueError(f"tokens {v} repeat a token")
        return v

    @field_validator("class_word")
    @classmethod
    def _class_word(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v or any(unicodedata.category(c).startswith("C") for c in v):
            raise ValueError("class_word must be a plain word or phrase, e.g. 'dog' or 'teddy bear'")
        return v

    @property
    def token_phrase(self) -> str:
        return " ".join(self.tokens)

    @property
    def subject(self) -> str:
        """The phrase that names the concept in a prompt: '<tok> dog' for objects, '<tok>' for styles."""
        return self.token_phrase if self.kind == "style" else f"{self.token_phrase} {self.class_word}"

    @property
    def stable_prompt(self) -> str:
        return STABLE_TEMPLATE[self.kind].format(self.subject)


@dataclass
class Concept:
    """A validated concept: spec, decoded RGB images and one caption (or None) per image."""

    spec: ConceptSpec
    images: list[Image.Image]
    captions: list[str | None]
    paths: list[Path] = field(default_factory=list)
    source: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.name


def load_image(path: Path, max_side: int = MAX_SIDE) -> Image.Image:
    """Decode an image fully into 8-bit RGB, upright per EXIF, longer side at most `max_side`.

    Pillow's guard against decompression bombs is kept: an image of over twice `Image.MAX_IMAGE_PIXELS` (about
    179 megapixels) is refused before it is decoded. Anything smaller is decoded (a big JPEG at a reduced size)
    and downscaled before it is converted to RGB, so a huge image is never copied at full size in RGB.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise Fl2tError(f"{path}: file is empty (0 bytes); replace or remove it")
    try:
        with warnings.catch_warnings():
            # Only DecompressionBombError (over twice the limit) refuses; the warning below it would refuse
            # ordinary 10000x10000 pictures.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (max_side, max_side))  # decode big JPEGs at reduced size
                im.load()
                im = ImageOps.exif_transpose(im)
                im = _to_rgb(_shrink(_to_8bit(im), max_side))
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)) / 1e6:.0f} megapixels, " if pixels else ""
        raise Fl2tError(
            f"{path}: image is too large to decode safely ({size}over Pillow's limit of "
            f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels); downscale it to at most {max_side} pixels a side"
        ) from None
    except MemoryError:
        raise Fl2tError(
            f"{path}: not enough memory to decode this image; downscale it to at most {max_side} pixels a side"
        ) from None
    except UnidentifiedImageError:
        raise Fl2tError(
            f"{path}: not a readable image (not a jpg, png or webp file); replace or remove the file"
        ) from None
    except Exception as e:  # a damaged file can make a decoder raise anything: truncation, bad chunks, ...
        raise Fl2tError(
            f"{path}: not a readable image, damaged or incomplete ({e or type(e).__name__}); replace or remove the file"
        ) from None
    if min(im.size) < 8:
        raise Fl2tError(
            f"{path}: image is {im.size[0]}x{im.size[1]} pixels, too small to learn from; use images at least 8 pixels a side"
        )
    return im


def _to_8bit(im: Image.Image) -> Image.Image:
    """An 8-bit mode Pillow resizes well: L, LA, RGB, RGBA or CMYK."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits by the type's range, not by clipping.
        a = np.asarray(im)
        top = 65535 if im.mode.startswith("I;16") or a.max() > 255 else 255
        a = (a.clip(0, top).astype(np.uint32) * 255 + top // 2) // top
        return Image.fromarray(a.astype(np.uint8), mode="L")
    if im.mode in ("LA", "RGBA", "CMYK") or (im.mode in ("L", "RGB") and "transparency" not in im.info):
        return im
    if im.mode == "1":
        return im.convert("L")
    # Palette colours, a transparent colour key, premultiplied alpha and the rest.
    return im.convert("RGBA" if im.has_transparency_data else "RGB")


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA"):
        # Transparent areas become white, as image viewers show them.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the text
    except UnicodeDecodeError:
        raise Fl2tError(f"{path}: not UTF-8 text; save it as UTF-8") from None


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in _read_text(path).splitlines() if ln.strip()]
    if not lines:
        raise Fl2tError(f"{path}: caption file is empty; write a caption or delete the file")
    return " ".join(lines[0].split())


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise Fl2tError(f"{path}: not valid YAML{at} ({what}); fix or delete the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Fl2tError(f"{path}: expected a mapping with keys name, tokens, class_word, kind (e.g. 'name: my-dog')")
    return data


def _dreambooth_class(root: Path, subject: str) -> str | None:
    table = root / "prompts_and_classes.txt"
    if not table.is_file():
        return None
    for line in _read_text(table).splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == subject:
            return parts[1]
    return None


def _default_class_word(name: str) -> str:
    # "dog2" -> "dog", "duck_toy" -> "duck toy"
    return re.sub(r"\d+$", "", name).replace("_", " ").replace("-", " ").strip() or name


def _with_token(caption: str, spec: ConceptSpec, where: Path) -> str:
    """A caption that names the concept by its token(s): kept if it has one, else the class phrase gets them."""
    if any(t in caption.split() for t in spec.tokens):
        return caption
    pattern = re.compile(rf"\b{re.escape(spec.class_word)}\b", re.IGNORECASE)
    if pattern.search(caption):
        return pattern.sub(lambda m: f"{spec.token_phrase} {m.group(0)}", caption, count=1)
    raise Fl2tError(
        f"{where}: caption {caption!r} names neither the concept token {spec.token_phrase!r} nor its class word "
        f"{spec.class_word!r}; write e.g. 'a photo of {spec.subject} on a beach'"
    )


def load_concept(
    path: str | Path,
    *,
    name: str | None = None,
    tokens: list[str] | None = None,
    class_word: str | None = None,
    kind: str | None = None,
    min_images: int = 3,
) -> Concept:
    """Read and validate one concept folder (any of the three layouts). Keyword arguments override the files."""
    folder = Path(path)
    if not folder.exists():
        raise Fl2tError(f"{folder}: no such concept folder")
    if not folder.is_dir():
        raise Fl2tError(f"{folder}: a concept is a folder of images, not a file")
    folder = folder.resolve()
    caption_dir = folder
    fields: dict = {}
    if folder.parent.name == "images" and (folder.parent.parent / "caption" / folder.name).is_dir():
        caption_dir = folder.parent.parent / "caption" / folder.name  # CIFC / CIDM layout
        if folder.name in CIFC_CONCEPTS:
            fields["class_word"], fields["kind"] = CIFC_CONCEPTS[folder.name]
    elif (db_class := _dreambooth_class(folder.parent, folder.name)) is not None:
        fields["class_word"] = db_class
    if (folder / "concept.yaml").is_file():
        fields.update(_read_yaml(folder / "concept.yaml"))
    overrides = {"name": name, "tokens": tokens, "class_word": class_word, "kind": kind}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields.setdefault("name", folder.name.lower().replace(" ", "_"))
    if isinstance(fields["name"], str):
        fields.setdefault("tokens", [f"<{fields['name']}>"])
        fields.setdefault("class_word", _default_class_word(fields["name"]))
    try:
        spec = ConceptSpec(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "concept"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key in concept.yaml; the keys are name, tokens, class_word, kind"
        elif err["type"] != "value_error":  # a wrong type or value: show it and a right one
            msg = (
                f"{msg} (got {err.get('input')!r}); write e.g. {SPEC_EXAMPLES.get(str(err['loc'][0]), 'name: my-dog')}"
            )
        raise Fl2tError(f"{folder}: {where}: {msg}") from None

    # Hidden files (macOS "._x.jpg" resource forks and the like) are not reference images.
    paths = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if len(paths) < min_images:
        found = "no images" if not paths else f"{len(paths)} image{'s' if len(paths) > 1 else ''}"
        raise Fl2tError(
            f"{folder}: found {found} (jpg, png, webp); a concept needs at least {min_images} reference images"
        )
    images = [load_image(p) for p in paths]
    captions = []
    for p in paths:
        cap_path = caption_dir / f"{p.stem}.txt"
        cap = _read_caption(cap_path)
        captions.append(None if cap is None else _with_token(cap, spec, cap_path))
    return Concept(spec=spec, images=images, captions=captions, paths=paths, source=folder)
