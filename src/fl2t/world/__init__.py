"""The tiny world (DESIGN.md §5): procedurally drawn pictures with captions, ten concepts the base model
never saw, and a tiny pretrained Stable-Diffusion-style pipeline and CLIP evaluator shipped in the package.

    from fl2t import world
    pipe = StableDiffusionPipeline.from_pretrained(world.base_path())
    world.write_concepts("concepts/")
"""

from __future__ import annotations

from pathlib import Path

from fl2t.errors import Fl2tError
from fl2t.world.concepts import CONCEPTS, PROMPT_TEMPLATES, WorldConcept, get_concept, write_concepts

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"  # in WEIGHTS_DIR: sha256 of every shipped file


def _shipped(sub: str, marker: str) -> Path:
    path = WEIGHTS_DIR / sub
    if not (path / marker).is_file():
        raise Fl2tError(
            f"the tiny world's weights are missing from {path}; rebuild them with `fl2t world build` "
            "(about an hour on 2 cores) or reinstall fl2t"
        )
    return path


def base_path() -> Path:
    """The shipped base pipeline folder: `StableDiffusionPipeline.from_pretrained(base_path())`."""
    return _shipped("base", "model_index.json")


def picture_side(base: Path | None = None) -> int:
    """The side in pixels of the pictures a world's base pipeline makes (default: the shipped world's), read from
    its configs: the UNet's latent side times the VAE's downscale factor. Concept references are drawn at it."""
    import json

    base = Path(base) if base is not None else base_path()
    unet = json.loads((base / "unet" / "config.json").read_text())
    vae = json.loads((base / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def evaluator_path() -> Path:
    """The shipped evaluator folder: `CLIPModel.from_pretrained(...)`, `CLIPProcessor.from_pretrained(...)`."""
    return _shipped("evaluator", "config.json")


def dino_path() -> Path:
    """The shipped DINO-like encoder's folder (`fl2t.metrics.DinoEvaluator.load(...)`); world v2 builds train one."""
    if not (WEIGHTS_DIR / "dino" / "config.json").is_file() and (WEIGHTS_DIR / "base").is_dir():
        raise Fl2tError(
            f"the installed tiny world has no DINO-like encoder ({WEIGHTS_DIR / 'dino'}): a v1 world "
            "(`fl2t world build --v1`) has none; rebuild with `fl2t world build`, or set `dino:` to a folder or "
            "leave it out"
        )
    return _shipped("dino", "config.json")


__all__ = [
    "CONCEPTS",
    "MANIFEST",
    "PROMPT_TEMPLATES",
    "WEIGHTS_DIR",
    "WorldConcept",
    "base_path",
    "dino_path",
    "evaluator_path",
    "get_concept",
    "picture_side",
    "write_concepts",
]
