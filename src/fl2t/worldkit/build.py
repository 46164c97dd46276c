"""`fl2t world build`: render the world and train its models from nothing, deterministically from a seed.

Stages (each seeded from (seed, stage), so a resumed build equals an uninterrupted one):
  vae        AutoencoderKL 32x32x3 <-> 16x16x4, on pictures with patterns and styles
  base       UNet + CLIP text encoder on plain pictures of the pretraining combinations, saved with the
             VAE, tokenizer and scheduler as a StableDiffusionPipeline folder
  evaluator  a tiny CLIPModel, contrastive on pictures with patterns and styles and their captions
Then `manifest.json` records the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import CLIPProcessor

from fl2t.errors import Fl2tError
from fl2t.world import MANIFEST, WEIGHTS_DIR
from fl2t.models import build_pipeline, clip_tokenizer
from fl2t.worldkit import models, train
from fl2t.world.concepts import concept_appearances
from fl2t.world.generator import Scene, random_scene

DEFAULT_SEED = 1234


@dataclass(frozen=True)
class BuildSettings:
    """How much of everything the build makes. Defaults fit in about an hour on 2 CPU cores."""

    seed: int = DEFAULT_SEED
    rich_images: int = 20_000  # pictures with patterns and styles (VAE, evaluator)
    plain_images: int = 24_000  # pretraining pictures of the base model (plain and patterned objects, no styles)
    vae_steps: int = 2_000  # 400 blurred the concepts' 2-pixel patterns (reference MAE 0.031-0.055; now 0.010-0.027)
    evaluator_steps: int = 2_000
    base_steps: int = 2_400  # a run may be stopped early (STOP_FILE); the manifest records the steps trained
    base_batch: int = 32
    # Torch threads. Use 1 while other jobs load the machine: with 2 threads and a busy core each op
    # waits for the starved thread (measured: 4.5 s vs 0.5 s per VAE step).
    threads: int = 2


def _stage_seed(seed: int, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}".encode()).digest()[:4], "little")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        refresh_per_second=2,
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(out: Path, info: dict) -> Path:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in (MANIFEST, SECONDS_FILE))
    manifest = {"files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files}, **info}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify_manifest(root: Path) -> list[str]:
    """Files whose sha256 differs from the manifest, or that are missing; [] when all match."""
    path = root / MANIFEST
    if not path.is_file():
        raise Fl2tError(f"no {MANIFEST} in {root}; rebuild the world with `fl2t world build --out {root}`")
    files = json.loads(path.read_text())["files"]
    bad = [rel for rel, digest in files.items() if not (root / rel).is_file() or sha256_file(root / rel) != digest]
    return sorted(bad)


def pretraining_scenes(seed: int, n: int) -> list[Scene]:
    """The base model's pictures: plain objects and two-colour patterns (as a real base model has seen striped
    things), only pretraining combinations, never a concept's look nor a style concept's rendering. (With plain
    objects only, a LoRA learned the concepts' colours but not their patterns: stripestar concept accuracy 0.31.)"""
    rng = np.random.default_rng(_stage_seed(seed, "plain"))
    exclude = concept_appearances()
    return [random_scene(rng, rich=True, styles=False, held_out=False, exclude=exclude) for _ in range(n)]


STAGES = ("vae", "base", "evaluator")
SECONDS_FILE = "build_seconds.json"  # per-stage wall time, kept across resumed runs; not hashed
STOP_FILE = "STOP"  # creating it ends base training after the current step (settings record the steps)


def build(
    out: Path = WEIGHTS_DIR, settings: BuildSettings = BuildSettings(), resume: bool = False, until: str = "evaluator"
) -> Path | None:
    """Build everything into `out` (base/, evaluator/, manifest.json); returns the manifest's path.

    resume: stages whose output already exists are loaded instead of trained again.
    until: stop after this stage (then no manifest is written and None is returned).
    """
    if until not in STAGES:
        raise Fl2tError(f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fl2tError(f"cannot create {out}: {e.strerror}; choose a writable --out directory") from e
    torch.set_num_threads(settings.threads)
    s = settings
    seconds: dict[str, float] = _previous_seconds(out) if resume else {}

    def record(stage: str, t0: float) -> None:
        seconds[stage] = round(time.time() - t0, 1)
        (out / SECONDS_FILE).write_text(json.dumps(seconds, indent=2) + "\n")

    vae_dir, eval_dir, base_dir = out / "base" / "vae", out / "evaluator", out / "base"
    with _progress() as progress:

        def bar(name: str, total: int):
            task = progress.add_task(name, total=total)
            return lambda n: progress.advance(task, n)

        rich_cache: list[train.Dataset] = []

        def rich() -> train.Dataset:
            """Pictures with patterns and styles, rendered once when a stage first needs them."""
            if not rich_cache:
                t0 = time.time()
                exclude = concept_appearances()
                rng = np.random.default_rng(_stage_seed(s.seed, "rich"))
                scenes = [random_scene(rng, rich=True, held_out=None, exclude=exclude) for _ in range(s.rich_images)]
                rich_cache.append(train.render_dataset(scenes, bar("render (patterns)", s.rich_images)))
                record("render_rich", t0)
            return rich_cache[0]

        t0 = time.time()
        if resume and (vae_dir / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(vae_dir)
        else:
            vae = train.train_vae(rich(), s.vae_steps, _stage_seed(s.seed, "vae"), bar("train VAE", s.vae_steps))
            vae.save_pretrained(vae_dir, safe_serialization=True)
            record("vae", t0)
        if until == "vae":
            return None

        if not (resume and (base_dir / "model_index.json").is_file()):
            t0 = time.time()
            plain_scenes = pretraining_scenes(s.seed, s.plain_images)
            plain = train.render_dataset(plain_scenes, bar("render (plain)", s.plain_images))
            latents = train.encode_latents(vae, plain, bar("encode latents", s.plain_images))
            record("render_plain", t0)
            t0 = time.time()
            unet, text, done = train.train_base(
                latents,
                plain_scenes,
                s.base_steps,
                _stage_seed(s.seed, "base"),
                bar("train base model", s.base_steps),
                batch=s.base_batch,
                log=progress.console.log,
                stop=lambda: (out / STOP_FILE).is_file(),
            )
            if done < s.base_steps:  # stopped early: the manifest records the steps trained
                (out / STOP_FILE).unlink()
            pipe = build_pipeline(unet, vae, text, models.sample_scheduler())
            pipe.save_pretrained(base_dir, safe_serialization=True)
            record("base", t0)
            seconds["base_steps_trained"] = done
            record("base", t0)
        if until == "base":
            return None

        t0 = time.time()
        if not (resume and (eval_dir / "config.json").is_file()):
            evaluator = train.train_evaluator(
                rich(), s.evaluator_steps, _stage_seed(s.seed, "evaluator"), bar("train evaluator", s.evaluator_steps)
            )
            evaluator.save_pretrained(eval_dir, safe_serialization=True)
            CLIPProcessor(image_processor=models.image_processor(), tokenizer=clip_tokenizer()).save_pretrained(
                eval_dir
            )
            record("evaluator", t0)

    _check_no_pickle(out)
    if "base_steps_trained" in seconds:  # a rebuild with these settings reproduces the weights
        s = replace(s, base_steps=int(seconds.pop("base_steps_trained")))
    info = {
        "settings": asdict(s),
        "build_seconds": seconds,
        "versions": {p: _version(p) for p in ("torch", "diffusers", "transformers")},
    }
    return write_manifest(out, info)


def _previous_seconds(out: Path) -> dict[str, float]:
    path = out / SECONDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _check_no_pickle(out: Path) -> None:
    """Only safetensors and text files ship; a pickle would run code when loaded."""
    bad = [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    for p in bad:
        p.unlink()
