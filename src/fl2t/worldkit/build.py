"""`fl2t world build`: render the world and train its models from nothing, deterministically from a seed.

Stages (each seeded from (seed, stage), so a resumed build equals an uninterrupted one):
  vae        AutoencoderKL 32x32x3 <-> 16x16x4 (convolutional: any side / 2), on pictures with patterns and styles
  base       UNet + CLIP text encoder on `side`-px pictures of the pretraining combinations, saved with the
             VAE, tokenizer and scheduler as a StableDiffusionPipeline folder
  evaluator  a tiny CLIPModel, contrastive on pictures with patterns and styles and their captions
  dino       (world v2) a DINO-like ViT, self-distilled on the same pictures without their captions
             (`fl2t.worldkit.dino`), the world's encoder for the field's DINO score
Then `manifest.json` records the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPProcessor

from fl2t import console
from fl2t.errors import Fl2tError
from fl2t.files import atomic_write_json
from fl2t.models import build_pipeline, clip_tokenizer
from fl2t.world import MANIFEST, WEIGHTS_DIR
from fl2t.world.concepts import concept_appearances, tuning_appearances
from fl2t.world.generator import SIZE, PairScene, Scene, random_pair, random_scene, styled_scene
from fl2t.worldkit import models, train, vocab

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
    # World v2's mix (issue 14; `fl2t world build`, V2_MIX): shares of two-object scenes and of generic styles among
    # the base model's pretraining pictures and among the VAE's and evaluator's. 0 is the v1 world (shipped until
    # 2026-12-05; `--v1`), whose pictures these settings then leave byte-identical.
    pair_share: float = 0.0
    style_share: float = 0.0
    rich_pair_share: float = 0.0
    rich_style_share: float = 0.0
    # The base model's picture side. The VAE and the evaluator train on SIZE-px pictures either way (the VAE is
    # convolutional and reconstructs 48 px renders as well as 32 px ones; the evaluator resizes what it reads to
    # SIZE, as real CLIP resizes to 224).
    side: int = SIZE
    # Keep only the token rows the world uses, in both text towers and their shared tokenizer (`vocab.py`): world
    # v2's shipped weights must stay <= 45 MB. Off for v1, whose rebuild reproduces the shipped files.
    compact_vocabulary: bool = False
    # The base model's shape and captions (v1: 2 text layers, 1 attention layer per cross-attention block, pairs
    # named in either order).
    text_layers: int = 2
    transformer_layers: int = 1
    pairs_left_first: bool = False
    patterned_share: float = 0.35  # of the base model's single-object pictures, drawn with a two-colour pattern
    pair_patterned: float = 0.3  # each object of a two-object picture patterned with this probability (base stage)
    # Steps of the DINO-like encoder's self-distillation (`dino/`); 0: no such stage (v1). Its separation of the
    # concepts stops rising after about 500 steps (docs/world.md).
    dino_steps: int = 0


# World v2 (issue 14), the shipped world's recipe since 2026-12-05 (docs/world.md; chosen 2026-12-04): 32 x 32 (the 48
# px bases read 0.25-0.46 on the pair gate, this one 0.774), both objects of most two-object pictures patterned
# (pair_patterned 0.8: the base then draws two patterned looks from words in 0.41 of pictures, 0.11 at 0.3), 6000 base
# steps (2810 s on one thread; the whole build fits the 90 minutes on 2 cores). The VAE trains 6000 steps: through the
# 2000-step one, outline's renders came back nearest outline 0.33 and mosaic's 0.67, through a 6000-step one 0.78 and
# 1.00 (tools/world_vae_ceiling.py; about 11 more minutes on one thread). The evaluator trains 5000 steps (was 2000; its
# CA ceiling's lowest concept, outline, read 0.90 after 2000): `--jobs 2` trains it beside the VAE and base model, which
# take longer, so its extra steps cost no wall time there.
V2_MIX = {
    "pair_share": 0.35,
    "style_share": 0.20,
    "rich_pair_share": 0.15,
    "rich_style_share": 0.15,
    "side": SIZE,
    "base_steps": 6_000,
    "pair_patterned": 0.8,
    "vae_steps": 6_000,
    "compact_vocabulary": True,
    "pairs_left_first": True,
    "patterned_share": 0.6,
    "dino_steps": 1_000,
    "evaluator_steps": 5_000,
}


def _stage_seed(seed: int, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}".encode()).digest()[:4], "little")


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
    atomic_write_json(path, manifest, sort_keys=False)
    return path


def verify_manifest(root: Path) -> list[str]:
    """Files whose sha256 differs from the manifest, or that are missing; [] when all match."""
    path = root / MANIFEST
    if not path.is_file():
        raise Fl2tError(f"no {MANIFEST} in {root}; rebuild the world with `fl2t world build --out {root}`")
    files = json.loads(path.read_text())["files"]
    bad = [rel for rel, digest in files.items() if not (root / rel).is_file() or sha256_file(root / rel) != digest]
    return sorted(bad)


def _mix(
    seed: int,
    stage: str,
    scenes: list[Scene],
    pair_share: float,
    style_share: float,
    exclude: frozenset,
    pair_patterned: float = 0.3,
) -> list[Scene | PairScene]:
    """Replace shares of `scenes` by two-object scenes and generic styles (pretraining combinations only), each
    drawn from its own stream, so that with both shares 0 the pictures are exactly `scenes`."""
    if not pair_share and not style_share:
        return list(scenes)
    pick = np.random.default_rng(_stage_seed(seed, f"{stage}:mix"))
    pairs = np.random.default_rng(_stage_seed(seed, f"{stage}:pairs"))
    styled = np.random.default_rng(_stage_seed(seed, f"{stage}:styles"))
    out: list[Scene | PairScene] = []
    for scene in scenes:
        u = pick.random()
        if u < pair_share:
            out.append(random_pair(pairs, held_out=False, patterned=pair_patterned, exclude=exclude))
        elif u < pair_share + style_share:
            out.append(styled_scene(styled, held_out=False, exclude=exclude))
        else:
            out.append(scene)
    return out


def pretraining_scenes(
    seed: int,
    n: int,
    pair_share: float = 0.0,
    style_share: float = 0.0,
    patterned: float = 0.35,
    pair_patterned: float = 0.3,
) -> list[Scene | PairScene]:
    """The base model's pictures: plain objects and two-colour patterns (as a real base model has seen striped
    things), only pretraining combinations, never a concept's look nor a style concept's rendering. (With plain
    objects only, a LoRA learned the concepts' colours but not their patterns: stripestar concept accuracy 0.31.)
    Nor a tuning concept's look (the shipped world's 24000 pictures, seed 1234, never drew one: the same pictures)."""
    rng = np.random.default_rng(_stage_seed(seed, "plain"))
    exclude = concept_appearances() | tuning_appearances()
    scenes = [
        random_scene(rng, rich=True, styles=False, held_out=False, exclude=exclude, patterned=patterned)
        for _ in range(n)
    ]
    return _mix(seed, "plain", scenes, pair_share, style_share, exclude, pair_patterned)


def rich_scenes(s: BuildSettings) -> list[Scene | PairScene]:
    """The VAE's, evaluator's and DINO-like encoder's pictures: patterns and the three style renderings, with the
    settings' shares of two-object scenes and generic styles; never a concept's look."""
    exclude = concept_appearances()
    rng = np.random.default_rng(_stage_seed(s.seed, "rich"))
    scenes = [random_scene(rng, rich=True, held_out=None, exclude=exclude) for _ in range(s.rich_images)]
    return _mix(s.seed, "rich", scenes, s.rich_pair_share, s.rich_style_share, exclude)


STAGES = ("vae", "base", "evaluator", "dino")
SECONDS_FILE = "build_seconds.json"  # per-stage wall time, kept across resumed runs; not hashed
STOP_FILE = "STOP"  # creating it ends base training after the current step (settings record the steps)


# The two chains `jobs=2` runs side by side: the base model trains in the VAE's latents, the evaluator and the DINO-like
# encoder read pictures only.
CHAINS = (("vae", "base"), ("evaluator", "dino"))


def build(
    out: Path = WEIGHTS_DIR,
    settings: BuildSettings = BuildSettings(),
    resume: bool = False,
    until: str = "dino",
    jobs: int = 1,
) -> Path | None:
    """Build everything into `out` (base/, evaluator/, dino/ when `settings.dino_steps`, manifest.json); returns the
    manifest's path.

    resume: stages whose output already exists are loaded instead of trained again.
    until: stop after this stage (then no manifest is written and None is returned).
    jobs: 2 runs the chains of CHAINS as two processes of settings.threads // 2 threads each, then writes the
    manifest; the weights are the same as with 1 (V2_MIX from nothing: 62 minutes on 2 cores, docs/world.md).
    """
    if until not in STAGES:
        raise Fl2tError(f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    if jobs not in (1, 2):
        raise Fl2tError(f"--jobs is 1 or 2 (the build has two independent chains), not {jobs}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fl2tError(f"cannot create {out}: {e.strerror}; choose a writable --out directory") from e
    if not resume:  # an earlier build's times (and steps trained) in this folder are not this build's
        (out / SECONDS_FILE).unlink(missing_ok=True)
    if jobs == 2:
        _run_chains(out, settings, resume, until)
        resume = True  # every stage the chains made is loaded below
    torch.set_num_threads(settings.threads)
    with console.progress() as progress:
        stages = _Stages(out, settings, resume, progress)
        stages.run(STAGES[: STAGES.index(until) + 1])
    if STAGES.index(until) < STAGES.index("dino" if settings.dino_steps else "evaluator"):  # v1 has no DINO stage
        return None
    if settings.compact_vocabulary:
        vocab.compact_vocabulary(out / "base", out / "evaluator", train.world_words(v2=True))
    _check_no_pickle(out)
    s, seconds = settings, stages.seconds
    if "base_steps_trained" in seconds:  # a rebuild with these settings reproduces the weights
        s = replace(s, base_steps=int(seconds.pop("base_steps_trained")))
    info = {
        "settings": asdict(s),
        "build_seconds": seconds,
        "versions": {p: _version(p) for p in ("torch", "diffusers", "transformers")},
    }
    return write_manifest(out, info)


def _run_chains(out: Path, settings: BuildSettings, resume: bool, until: str) -> None:
    """Each chain of CHAINS (cut at `until`) in its own process; raises the first chain's error."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    wanted = STAGES[: STAGES.index(until) + 1]
    chains = [tuple(st for st in chain if st in wanted) for chain in CHAINS]
    chains = [c for c in chains if c]
    child = replace(settings, threads=max(1, settings.threads // 2))
    with ProcessPoolExecutor(len(chains), mp_context=mp.get_context("spawn")) as pool:
        for future in [pool.submit(_chain, out, child, resume, chain, os.getpid()) for chain in chains]:
            future.result()


def _chain(out: Path, settings: BuildSettings, resume: bool, chain: tuple[str, ...], parent: int) -> None:
    """Run the stages of one chain (a child process of `_run_chains`); it ends when the build's process does."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    torch.set_num_threads(settings.threads)
    with console.progress() as progress:
        _Stages(out, settings, resume, progress).run(chain)


class _Stages:
    """The build's stages, each timed into SECONDS_FILE and, with `resume`, skipped when its output exists."""

    def __init__(self, out: Path, settings: BuildSettings, resume: bool, progress: Any):
        self.out, self.s, self.resume, self.progress = out, settings, resume, progress
        self.seconds: dict[str, float] = _previous_seconds(out) if resume else {}
        self.vae_dir, self.eval_dir, self.base_dir = out / "base" / "vae", out / "evaluator", out / "base"
        self.dino_dir = out / "dino"
        self._rich: train.Dataset | None = None

    def run(self, names: Sequence[str]) -> None:
        """The named stages in STAGES' order (the base model trains in the VAE's latents: "base" follows "vae")."""
        vae = None
        for name in names:
            if name == "vae":
                vae = self.vae()
            elif name == "base":
                self.base(vae)
            else:
                getattr(self, name)()

    def record(self, stage: str, t0: float) -> None:
        """Add this stage's seconds to SECONDS_FILE, keeping what another chain's process wrote there meanwhile."""
        import fcntl

        self.seconds[stage] = round(time.time() - t0, 1)
        folder = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            self.seconds = {**_previous_seconds(self.out), **self.seconds}
            atomic_write_json(self.out / SECONDS_FILE, self.seconds, sort_keys=False)
        finally:
            os.close(folder)

    def bar(self, name: str, total: int) -> Callable[[int], None]:
        task = self.progress.add_task(name, total=total, info="")
        return lambda n: self.progress.advance(task, n)

    def rich(self) -> train.Dataset:
        """Pictures with patterns and styles, rendered once when a stage first needs them."""
        if self._rich is None:
            t0 = time.time()
            bar = self.bar("render (patterns)", self.s.rich_images)
            self._rich = train.render_dataset(rich_scenes(self.s), bar)
            self.record("render_rich", t0)
        return self._rich

    def vae(self) -> AutoencoderKL:
        if self.resume and (self.vae_dir / "config.json").is_file():
            return AutoencoderKL.from_pretrained(self.vae_dir)
        t0, s = time.time(), self.s
        vae = train.train_vae(self.rich(), s.vae_steps, _stage_seed(s.seed, "vae"), self.bar("train VAE", s.vae_steps))
        vae.save_pretrained(self.vae_dir, safe_serialization=True)
        self.record("vae", t0)
        return vae

    def base(self, vae: AutoencoderKL) -> None:
        if self.resume and (self.base_dir / "model_index.json").is_file():
            return
        t0, s = time.time(), self.s
        plain_scenes = pretraining_scenes(
            s.seed, s.plain_images, s.pair_share, s.style_share, s.patterned_share, s.pair_patterned
        )
        plain = train.render_dataset(plain_scenes, self.bar("render (plain)", s.plain_images), s.side)
        latents = train.encode_latents(vae, plain, self.bar("encode latents", s.plain_images))
        self.record("render_plain", t0)
        t0 = time.time()
        unet, text, done = train.train_base(
            latents,
            plain_scenes,
            s.base_steps,
            _stage_seed(s.seed, "base"),
            self.bar("train base model", s.base_steps),
            batch=s.base_batch,
            log=console.console.log,
            stop=lambda: (self.out / STOP_FILE).is_file(),
            text_layers=s.text_layers,
            transformer_layers=s.transformer_layers,
            pairs_left_first=s.pairs_left_first,
        )
        if done < s.base_steps:  # stopped early: the manifest records the steps trained
            (self.out / STOP_FILE).unlink()
        build_pipeline(unet, vae, text, models.sample_scheduler()).save_pretrained(
            self.base_dir, safe_serialization=True
        )
        self.seconds["base_steps_trained"] = done
        self.record("base", t0)

    def evaluator(self) -> None:
        if self.resume and (self.eval_dir / "config.json").is_file():
            return
        t0, s = time.time(), self.s
        bar = self.bar("train evaluator", s.evaluator_steps)
        evaluator = train.train_evaluator(self.rich(), s.evaluator_steps, _stage_seed(s.seed, "evaluator"), bar)
        evaluator.save_pretrained(self.eval_dir, safe_serialization=True)
        CLIPProcessor(image_processor=models.image_processor(), tokenizer=clip_tokenizer()).save_pretrained(
            self.eval_dir
        )
        self.record("evaluator", t0)

    def dino(self) -> None:
        if not self.s.dino_steps or (self.resume and (self.dino_dir / "config.json").is_file()):
            return
        from fl2t.worldkit.dino import train_dino

        t0, s = time.time(), self.s
        bar = self.bar("train DINO-like encoder", s.dino_steps)
        encoder, processor = train_dino(self.rich(), s.dino_steps, _stage_seed(s.seed, "dino"), bar)
        encoder.save_pretrained(self.dino_dir, safe_serialization=True)
        processor.save_pretrained(self.dino_dir)
        self.record("dino", t0)


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
