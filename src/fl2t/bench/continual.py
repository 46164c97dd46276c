"""`fl2t bench continual`: the continual protocol of DESIGN §4 over several task orders.

For each method and order: learn the concepts one task at a time; after each task t, generate every concept
learned so far and score it → the matrices R[t][i] (IA, normalised IA, CA, TA, DINO). Then the final row
(V1..VG), its average, the average forgetting, a multi-concept score, and the spread of the final average
over orders. Every finished task and evaluation is cached under `runs/<name>/`, and a rerun skips it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from fl2t.bench.compute import counted_task, method_compute, store_learned
from fl2t.bench.jobs import Claims, Unit
from fl2t.bench.stats import FORGETTING, comparisons, forgetting, has_samples, method_stats
from fl2t.bench.variants import Row, Variant, check_variants, resolve_row
from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.data import Concept, load_concept
from fl2t.errors import Fl2tError
from fl2t.files import atomic_write_bytes, atomic_write_text
from fl2t.library import Library
from fl2t.metrics import (
    ClipEvaluator,
    DinoEvaluator,
    average_forgetting,
    class_prompt,
    image_alignments,
    nearest_concepts,
    reference_alignment,
    text_alignments,
)

if TYPE_CHECKING:
    from fl2t.consolidate.fidelity import Target
    from fl2t.methods import Method
    from fl2t.sampling import Sampler

POLL_S = 1.0  # how often a worker with nothing to claim looks again
BUILTIN = Path(__file__).resolve().parent.parent / "benchmarks"
METRICS = ("nia", "ia", "ca", "ta", "dino", "fidelity")
DROP = 0.2  # a concept "lost" for the fidelity check: its CA 20 points below its expert's alone (the oracle's)


class SampleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(25, ge=1, description="denoising steps")
    guidance: float = Field(5.0, ge=0, description="classifier-free guidance scale")
    size: int | None = Field(None, ge=8, description="image size; default: the base model's")


class ConceptEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="concept folder, relative to `data` (or a tiny-world concept name with world: true)")
    prompts: str | None = Field(None, description="prompt set: object, pet or style (default: the concept's kind)")


class BenchConfig(BaseModel):
    """A benchmark YAML. Relative paths are resolved against `data` (the --data option overrides it)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    base: str = Field("world", description="base model: 'world' (the tiny world), a hub id or a local folder")
    world: bool = Field(False, description="the concepts are tiny-world concepts, written into the run folder")
    data: str | None = Field(None, description="folder the concept paths are relative to")
    concepts: list[ConceptEntry | str] = Field(min_length=2)
    orders: int | list[list[str]] = Field(
        1, description="number of task orders (the listed one, then seeded shuffles), or the orders"
    )
    order_seed: int = 0
    prompts: dict[str, list[str]] | None = Field(
        None,
        description=(
            "evaluation prompt templates per prompt set (object, pet, style); {} is the concept's subject; "
            "default with world: the world's"
        ),
    )
    prompts_per_concept: int | None = Field(None, ge=1, description="use the first N templates (default: all)")
    images_per_prompt: int = Field(1, ge=1)
    final_images_per_prompt: int | None = Field(
        None,
        ge=1,
        description=(
            "images per prompt in each order's last evaluation (the final row), whose intervals need more images "
            "than the rows before it; none: images_per_prompt"
        ),
    )
    class_images: int = Field(8, ge=1, description="base-model images of the class word per concept, for CA")
    multi_images: int | None = Field(
        None, ge=1, description="images per multi-concept pair; none: final_images_per_prompt, at least 4"
    )
    multi: list[list[str]] = Field(
        default_factory=list, description="pairs of concept names for the multi-concept score"
    )
    multi_prompts: dict[str, str] = Field(
        default_factory=lambda: {"object+style": "a {} in the style of {}", "object+object": "a {} and a {}"},
        description="multi-concept template per pair kind ({} are the two subjects)",
    )
    seed: int = 0
    sample: SampleSettings = Field(default_factory=SampleSettings)
    clip: str = Field(
        "world", description="CLIP evaluator: 'world', a hub id (openai/clip-vit-base-patch32) or a folder"
    )
    dino: str | None = Field(
        None,
        description=(
            "DINO evaluator: 'world' (the tiny world's DINO-like encoder, in v2 worlds), a hub id "
            "(facebook/dino-vits16) or a folder; none: no DINO column"
        ),
    )
    fidelity: bool = Field(
        False,
        description=(
            "also score each concept's fidelity (DESIGN §4) under every method after every task, against its expert "
            "learned alone (learned for the purpose when no method shares it)"
        ),
    )
    learn: LearnSettings = Field(default_factory=LearnSettings)
    consolidate: ConsolidateSettings = Field(default_factory=ConsolidateSettings)
    # Each a fl2t.methods MethodSettings subclass (imported by the validator only when settings are given).
    methods: dict[str, SerializeAsAny[BaseModel]] = Field(
        default_factory=dict,
        description="per-method settings, each method's own model (e.g. ewc: {ewc_lambda: 1e4}); unlisted: defaults",
    )
    variants: dict[str, Variant] = Field(
        default_factory=dict,
        description=(
            "named rows that run a method with other settings, usable as a method name (bench/variants.py), e.g. "
            "cidm+tokens+compute: {method: cidm+tokens, learn: {steps: 700}}"
        ),
    )

    @field_validator("methods", mode="before")
    @classmethod
    def _method_settings(cls, raw: Any) -> Any:
        """Each listed method's settings as its typed model (`EWCSettings` for ewc); an unknown method, setting or
        value is refused with what was wrong."""
        if not isinstance(raw, dict) or not raw:
            return raw
        from fl2t.methods import method_settings

        try:
            return {name: method_settings(name, values) for name, values in raw.items()}
        except Fl2tError as e:
            raise PydanticCustomError("method_settings", "{message}", {"message": str(e)}) from None

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants: dict[str, Variant], info: Any) -> dict[str, Variant]:
        """Each variant resolved against the settings above it; an unknown method or setting names the variant."""
        d = info.data
        try:
            return check_variants(
                variants,
                d.get("learn", LearnSettings()),
                d.get("consolidate", ConsolidateSettings()),
                d.get("methods", {}),
            )
        except Fl2tError as e:
            raise PydanticCustomError("variants", "{message}", {"message": str(e)}) from None

    def row(self, name: str) -> Row:
        """What the results row `name` runs: the method of that name with these settings, or the variant."""
        return resolve_row(name, self.variants, self.learn, self.consolidate, self.methods)

    @field_validator("final_images_per_prompt")
    @classmethod
    def _final_images(cls, final: int | None, info: Any) -> int | None:
        """The final row has at least the images of the rows before it (their samples are its first ones)."""
        row = info.data.get("images_per_prompt", 1)
        if final is not None and final < row:
            raise PydanticCustomError(
                "final_images", "{final} is below images_per_prompt ({row})", {"final": final, "row": row}
            )
        return final


def load_config(path: str | Path, **overrides: Any) -> BenchConfig:
    """A YAML file, or the name of a built-in one (tiny10, cifc, dreambooth); overrides replace top-level keys."""
    p, raw = read_config(path)
    if "grid" in raw:
        raise Fl2tError(f"{p}: a tuning config (it has a grid): run it with `fl2t bench tune --config {path}`")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(p, raw)


def read_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The YAML mapping of a benchmark config file, or of a built-in one by name, and its path."""
    p = Path(path)
    if not p.suffix and not p.exists():
        p = BUILTIN / f"{path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in BUILTIN.glob("*.yaml")))
        raise Fl2tError(f"{path}: no such benchmark config (a YAML file, or one of: {known})")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise Fl2tError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise Fl2tError(f"{p}: a benchmark config is a mapping of settings")
    return p, raw


def make_config(p: Path, raw: dict[str, Any]) -> BenchConfig:
    """The config of file `p` from its mapping; what is wrong in it is an Fl2tError naming the file and key."""
    try:
        return BenchConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise Fl2tError(f"{p}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


def task_orders(cfg: BenchConfig, names: list[str]) -> list[list[str]]:
    if isinstance(cfg.orders, list):
        for o in cfg.orders:
            if sorted(o) != sorted(names):
                raise Fl2tError(f"order {o} is not a permutation of the concepts {names}")
        return [list(o) for o in cfg.orders]
    rng = random.Random(cfg.order_seed)
    orders = [list(names)]
    while len(orders) < cfg.orders:
        o = list(names)
        rng.shuffle(o)
        if o not in orders or len(orders) >= math.factorial(len(names)):
            orders.append(o)
    return orders


def _no_none(value: Any) -> Any:
    """`value` with every None setting left out, at any depth: a run recorded before a setting existed (it defaults
    to None, off) compares equal to one that records it."""
    if isinstance(value, dict):
        return {k: _no_none(v) for k, v in value.items() if v is not None}
    return value


@dataclass
class Evaluated:
    """A concept's fixed evaluation material: prompts, seeds, reference and class-image embeddings. The prompts
    and seeds are those of the final row; a row before it takes the first `row` of them."""

    concept: Concept
    prompts: list[str]
    seeds: list[int]
    row: int  # images of a row before the last
    class_texts: list[str]
    refs: torch.Tensor  # (M, D) CLIP
    refs_dino: torch.Tensor | None
    ref_ia: float  # the references' mean IA among themselves
    ref_dino: float | None
    class_images: torch.Tensor  # (K, D) CLIP embeddings of base-model images of the class word
    class_texts_emb: torch.Tensor  # (N, D) CLIP embeddings of the prompts with the class word (for TA)


class Benchmark:
    def __init__(
        self,
        cfg: BenchConfig,
        out: Path,
        methods: list[str],
        progress: Callable[[], Any] | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        from fl2t.methods import METHODS

        unknown = [m for m in methods if m not in METHODS and m not in cfg.variants]
        if unknown:
            rows = ", ".join([*METHODS, *cfg.variants])  # the config's variants serve as methods too
            raise Fl2tError(f"unknown method(s) {', '.join(unknown)}; choose from {rows}")
        # The benchmark's own copy, filled in below (prompts); the caller's stays as given.
        self.cfg, self.methods, self.say = cfg.model_copy(deep=True), methods, say
        self.rows: dict[str, Row] = {m: self.cfg.row(m) for m in methods}  # what each row runs (bench/variants.py)
        self.out = Path(out) / cfg.name
        self.progress = progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = self._base()
        self._check_fingerprint()
        self.concepts = self._concepts()
        self.names = [c.name for c in self.concepts]
        self.orders = task_orders(cfg, self.names)
        self._clip: ClipEvaluator | None = None
        self._dino: DinoEvaluator | None = None
        self._eval: dict[str, Evaluated] = {}
        self._status: Callable[[str], None] = lambda text: None
        self._step: Callable[[int, float], None] = lambda i, loss: None
        # A concept's images under a method that samples each concept alone: (workdir, concept) -> images, CLIP
        self._per_concept: dict[tuple[str, str], tuple[list[Image.Image], torch.Tensor]] = {}
        self._targets: dict[str, Target] = {}  # a concept's fidelity target, from its expert learned alone

    # -- inputs -----------------------------------------------------------------------------------------
    def _base(self) -> str:
        if self.cfg.base == "world":
            from fl2t.world import base_path

            return str(base_path())
        return self.cfg.base

    def _check_fingerprint(self) -> None:
        """Cached results are reused only by a run with the same base weights and settings; another run in the
        same folder would mix two experiments silently. More orders, methods or variants resume (the record keeps
        every variant run in the folder); anything else, a variant defined otherwise included, is refused."""
        cfg = self.cfg.model_dump(exclude={"name", "orders", "data"})
        for name in ("base", "clip", "dino"):
            if cfg[name] == "world":  # the shipped world: its manifest holds the hashes of its models
                from fl2t.world import MANIFEST, base_path, dino_path

                if name == "dino":
                    dino_path()  # a v1 world has none: said before anything runs

                manifest = (base_path().parent / MANIFEST).read_bytes()
                cfg[name] = "world " + hashlib.sha256(manifest).hexdigest()[:16]
            elif cfg[name] is not None:
                cfg[name] = _weights_fingerprint(self.base if name == "base" else cfg[name])
        cfg = json.loads(json.dumps(cfg, default=str))
        # A setting left at None is left out: a run made before the setting existed has the same record.
        cfg = {k: v for k, v in cfg.items() if v is not None}
        variants = cfg.pop("variants")
        path = self.out / "run.json"
        if path.is_file():
            old = json.loads(path.read_text())
            known = old.pop("variants", {})
            differ = sorted(k for k in set(old) | set(cfg) if _no_none(old.get(k)) != _no_none(cfg.get(k)))
            differ += [
                f"variant {v}"
                for v in sorted(set(known) & set(variants))
                if _no_none(known[v]) != _no_none(variants[v])
            ]
            if differ:
                raise Fl2tError(
                    f"{self.out} holds results made with other settings ({', '.join(differ)} differ); "
                    "choose another --out, or remove that folder to start again"
                )
            if set(variants) - set(known):
                atomic_write_text(path, json.dumps({**cfg, "variants": {**known, **variants}}, indent=2) + "\n")
        elif any(self.out.glob("*/order*/task*.json")):
            raise Fl2tError(
                f"{self.out} holds results without a record of their settings (an older run); "
                "choose another --out, or remove that folder to start again"
            )
        else:
            atomic_write_text(
                path, json.dumps({**cfg, **({"variants": variants} if variants else {})}, indent=2) + "\n"
            )

    def _concepts(self) -> list[Concept]:
        cfg = self.cfg
        entries = [ConceptEntry(path=e) if isinstance(e, str) else e for e in cfg.concepts]
        if cfg.world:
            from fl2t.world import get_concept
            from fl2t.world.concepts import write_concept

            folder = self.out / "concepts"
            folder.mkdir(exist_ok=True)
            with _exclusive(self.out / ".concepts.lock"):  # workers of one run write them once, not at once
                paths = [folder / e.path for e in entries]
                for e, p in zip(entries, paths):
                    if not (p / "concept.yaml").is_file():
                        write_concept(get_concept(e.path), folder)
        else:
            if cfg.data is None:
                raise Fl2tError(f"benchmark {cfg.name}: give the data folder with --data (the concepts' local copy)")
            root = Path(cfg.data).expanduser()
            if not root.is_dir():
                raise Fl2tError(f"benchmark {cfg.name}: data folder {root} does not exist")
            paths = [root / e.path for e in entries]
        concepts = [load_concept(p, min_images=2) for p in paths]
        if cfg.prompts is None:
            if not cfg.world:
                raise Fl2tError(
                    f"benchmark {cfg.name}: give the evaluation prompts per kind "
                    "(prompts: {object: [...], style: [...]})"
                )
            from fl2t.world import PROMPT_TEMPLATES

            cfg.prompts = {k: list(v) for k, v in PROMPT_TEMPLATES.items()}
        self.prompt_sets = {c.name: e.prompts or c.spec.kind for c, e in zip(concepts, entries)}
        for c in concepts:
            if self.prompt_sets[c.name] not in cfg.prompts:
                raise Fl2tError(
                    f"benchmark {cfg.name}: no prompts for set {self.prompt_sets[c.name]!r} (concept {c.name})"
                )
        if len({c.name for c in concepts}) != len(concepts):
            raise Fl2tError(f"benchmark {cfg.name}: two concepts have the same name")
        return concepts

    @property
    def device(self) -> torch.device:
        """Where this process samples and evaluates: its accelerator."""
        from fl2t.parallel import accelerator_device

        return accelerator_device()

    @property
    def autocast(self) -> torch.dtype | None:
        """The configured mixed precision (learn.mixed_precision) for sampling on a GPU; None on the CPU."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.cfg.learn.mixed_precision)
        return dtype if self.device.type == "cuda" else None

    def sampler(self, method: Method, concept: str | None = None) -> Sampler:
        """The method's sampler, in the configured precision."""
        sampler = method.sampler(concept)
        sampler.autocast = self.autocast
        return sampler

    @property
    def clip(self) -> ClipEvaluator:
        if self._clip is None:
            if self.cfg.clip == "world":
                from fl2t.world import evaluator_path

                self._clip = ClipEvaluator.load(evaluator_path(), self.device)
            else:
                self._clip = ClipEvaluator.load(self.cfg.clip, self.device)
        return self._clip

    @property
    def dino(self) -> DinoEvaluator | None:
        if self._dino is None and self.cfg.dino:
            from fl2t.world import dino_path

            self._dino = DinoEvaluator.load(dino_path() if self.cfg.dino == "world" else self.cfg.dino, self.device)
        return self._dino

    def evaluated(self, name: str) -> Evaluated:
        """Prompts, seeds and the reference/class embeddings of a concept (class images generated once, cached)."""
        if name in self._eval:
            return self._eval[name]
        cfg = self.cfg
        c = next(x for x in self.concepts if x.name == name)
        spec = c.spec
        templates = cfg.prompts[self.prompt_sets[name]][: cfg.prompts_per_concept]
        # Image r of template j has seed `seed + r·len(templates) + j`: a row's images are the first of the final
        # row's (which may have more per prompt), so every row scores the same (prompt, seed) samples.
        final = cfg.final_images_per_prompt or cfg.images_per_prompt
        prompts = [t.format(spec.subject) for _ in range(final) for t in templates]
        seeds = [cfg.seed + i for i in range(len(prompts))]
        row = len(templates) * cfg.images_per_prompt
        class_texts = [class_prompt(p, spec.tokens, spec.class_word) for p in prompts]
        refs = self.clip.image_embeds(c.images)
        refs_dino = self.dino.image_embeds(c.images) if self.dino else None
        cache = self.out / "class_images" / f"{name}.safetensors"
        if cache.is_file():
            from safetensors.torch import load_file

            class_emb = load_file(cache)["clip"]
        else:
            from safetensors.torch import save

            from fl2t.models import load_base
            from fl2t.sampling import Sampler

            pipe = load_base(self.base, device=self.device)
            pipe.set_progress_bar_config(disable=True)
            # The class word's images: the concept's own prompts with its tokens replaced.
            texts = [class_texts[i % len(class_texts)] for i in range(cfg.class_images)]
            seeds_class = [cfg.seed + 50_000 + i for i in range(len(texts))]
            sampler = Sampler(pipe, autocast=self.autocast)
            images = sampler(texts, seeds_class, cfg.sample.steps, cfg.sample.guidance, cfg.sample.size)
            class_emb = self.clip.image_embeds(images)
            cache.parent.mkdir(exist_ok=True)
            atomic_write_bytes(cache, save({"clip": class_emb.contiguous()}))
        ref_dino = reference_alignment(refs_dino) if refs_dino is not None else None
        texts_emb = self.clip.text_embeds(class_texts)
        ref_ia = reference_alignment(refs)
        ev = Evaluated(c, prompts, seeds, row, class_texts, refs, refs_dino, ref_ia, ref_dino, class_emb, texts_emb)
        self._eval[name] = ev
        return ev

    # -- one method, one order ----------------------------------------------------------------------------
    def method_dir(self, method: str, k: int) -> Path:
        return self.out / method / f"order{k}"

    def run(self, shard: tuple[int, int] | None = None) -> dict[str, Any] | None:
        """Do the work not done yet, spread over the workers (bench/jobs.py), and return the results; None for a
        worker that leaves the report to another: any `shard` (a final `report()` run merges), and ranks other than 0
        under torchrun (rank 0 waits for the others and writes it)."""
        index, owner = self._worker(shard)
        claims = Claims(self.out / "jobs", owner)
        total = len(self.methods) * len(self.orders) * len(self.names)
        with self._bar("tasks", total) as advance:
            self._work(claims, advance, wait=shard is None and index == 0)
        if shard is not None or index != 0:
            return None
        return self.report()

    def report(self) -> dict[str, Any]:
        """The results of finished work, written to results.json; refused while some work is not finished."""
        missing = [u.key for u in self.units() if not self.finished(u)]
        if missing:
            raise Fl2tError(
                f"{self.out}: not finished: {', '.join(missing)}; run the shards that hold them (`fl2t bench jobs`)"
            )
        results = self.results()
        atomic_write_text(self.out / "results.json", json.dumps(results, indent=2) + "\n")
        return results

    # -- work spread over processes -----------------------------------------------------------------------
    def _worker(self, shard: tuple[int, int] | None) -> tuple[int, str]:
        if shard is not None:
            return shard[0], f"shard {shard[0]}/{shard[1]}"
        from fl2t.parallel import process_state

        state = process_state()  # the ranks of torchrun / accelerate launch; one process: rank 0 of 1
        return state.process_index, f"rank {state.process_index}/{state.num_processes}"

    def needs_store(self, method: str) -> bool:
        """The method's work uses the experts learned alone (its own, or the fidelity targets)."""
        from fl2t.methods import METHODS
        from fl2t.methods.base import AloneMethod

        return self.cfg.fidelity or issubclass(METHODS[self.rows[method].method], AloneMethod)

    def units(self) -> list[Unit]:
        """The run's work: the experts learned alone first (shared), then each (method, order), those that need no
        shared expert first, so a worker can start on them while others learn the experts."""
        store = any(self.needs_store(m) for m in self.methods)
        runs = [Unit.run(m, k) for m in self.methods for k in range(len(self.orders))]
        return [Unit.expert(n) for n in self.names if store] + sorted(runs, key=lambda u: self.needs_store(u.method))

    def finished(self, unit: Unit) -> bool:
        if unit.concept is not None:
            store = Library(self.out / "experts")
            return store.exists and unit.concept in store.names()
        folder = self.method_dir(unit.method, unit.order)
        return all((folder / f"task{t}.json").is_file() for t in range(len(self.names)))

    def _work(self, claims: Claims, advance: Callable[[int], None], wait: bool) -> None:
        """Claim and do units until none is left to claim; with `wait`, until every unit is finished (doing any a
        worker that died left)."""
        pending, by_name = self.units(), {c.name: c for c in self.concepts}
        while pending:
            experts_ready = all(self.finished(u) for u in pending if u.concept is not None)
            for unit in pending:
                if self.finished(unit):
                    advance(0 if unit.concept else len(self.names))
                    break
                if unit.concept is None and self.needs_store(unit.method) and not experts_ready:
                    continue
                if claims.claim(unit):
                    if unit.concept is not None:
                        self._status(f"learn {unit.concept} alone (shared)")
                        claims.progress(unit, "learning")
                        store_learned(self.store_learner(), by_name[unit.concept], self.out)
                    else:
                        self.run_order(unit.method, unit.order, self.orders[unit.order], advance, claims, unit)
                    claims.done(unit)
                    break
            else:  # nothing to claim now: what is left is held by others, or waits for experts others learn
                held = [u for u in pending if claims.holder(u) not in (None, claims.owner)]
                if len(held) == len(pending) and not wait:
                    return
                self._status(f"waiting for {len(pending)} unit(s) others hold: {', '.join(u.key for u in held[:3])}")
                time.sleep(POLL_S)
                continue
            pending.remove(unit)

    @contextmanager
    def _bar(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yields advance(n); while open, `self._status(text)` shows what runs next to the bar."""
        if self.progress is None:
            yield lambda n=1: None
            return
        with self.progress() as p:
            task = p.add_task(name, total=total, info="")
            phase = [""]

            def status(text: str) -> None:
                phase[0] = text
                p.update(task, info=text)

            self._status = status
            # Training steps show beside the phase, so a log gets a line every few seconds, not one per task.
            self._step = lambda i, loss: p.update(task, info=f"{phase[0]}: step {i + 1}, loss {loss:.4f}")
            yield lambda n=1: p.advance(task, n)
        self._status = lambda text: None
        self._step = lambda i, loss: None

    def method(self, name: str, k: int, learn: LearnSettings | None = None) -> Method:
        """Row `name`'s method with its state for order k and the row's settings: the config's, the method's own
        from it (or its defaults), or a variant's. `learn` replaces the row's Step-1 settings."""
        from fl2t.methods import METHODS, MethodContext

        row = self.rows[name]
        ctx = MethodContext(
            base=self.base,
            learn=learn or row.learn,
            workdir=self.method_dir(name, k) / "state",
            store=self.out / "experts",
            consolidate=row.consolidate,
            settings=row.settings,  # None: the method's defaults
            on_step=lambda i, loss: self._step(i, loss),
        )
        return METHODS[row.method](ctx)

    def store_learner(self) -> Method:
        """What learns the shared store's experts (the expert units, fidelity targets): a method at the config's
        Step-1 settings, so that a variant's learn override never reaches the store."""
        return self.method(self.methods[0], 0, learn=self.cfg.learn)

    def run_order(
        self,
        method: str,
        k: int,
        order: list[str],
        advance: Callable[[int], None],
        claims: Claims | None = None,
        unit: Unit | None = None,
    ) -> None:
        """One method over one order, task by task (finished tasks skipped); progress into the unit's claim."""
        folder = self.method_dir(method, k)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "order.json").write_text(json.dumps(order))
        m = self.method(method, k)
        if m.tasks != order[: len(m.tasks)]:
            raise Fl2tError(f"{folder}: its state was made for another task order; remove the folder to start it again")
        by_name = {c.name: c for c in self.concepts}
        for t, name in enumerate(order):
            result = folder / f"task{t}.json"
            if result.is_file() and name not in m.tasks:
                # Its scores were kept but not the method's state (a run folder whose task files were committed
                # without the weights, on another clone): rebuild the state, deterministic, keep the scores.
                self._status(f"{method} order {k}: rebuild its state, {name} ({t + 1}/{len(order)})")
                counted_task(m, by_name[name], self.out)
            if result.is_file():
                advance(1)
                continue
            self._status(f"{method} order {k}: learn {name} ({t + 1}/{len(order)})")
            if claims is not None and unit is not None:
                claims.progress(unit, f"task {t + 1}/{len(order)}: {name}")
            compute = counted_task(m, by_name[name], self.out)  # learn (unless done) and consolidate, counted
            self._status(f"{method} order {k}: evaluate {t + 1} concepts")
            last = t == len(order) - 1
            scores = self.evaluate(m, order[: t + 1], order[: t + 1], save_grid=folder / "grids" if last else None)
            if last and self.cfg.multi and not m.samples_per_concept:
                scores["_multi"], scores["_multi_samples"] = self.multi(m)
            if self.cfg.fidelity:
                for name, f in self.fidelity(m, order[: t + 1]).items():
                    scores[name]["fidelity"] = f
            scores["_compute"] = compute
            atomic_write_text(result, json.dumps(scores, separators=(",", ":")))  # per-image lists: compact
            advance(1)

    def evaluate(
        self, method: Method, names: list[str], learned: list[str], save_grid: Path | None = None
    ) -> dict[str, dict[str, Any]]:
        """Scores of the concepts `names` under the method's current model, which has learned `learned`: each
        metric's mean, and per image (`samples`, in the order of their seeds, which pair them across methods and
        rows) IA, nIA, CA (0 or 1), TA, DINO and the concept it is nearest (`label`, for the confusion matrix).
        With every concept learned (an order's last task) the final row's images: `final_images_per_prompt`."""
        sampler = None if method.samples_per_concept else self.sampler(method)
        references = {n: self.evaluated(n).refs for n in learned}
        final = len(learned) == len(self.names)
        out = {}
        for name in names:
            ev = self.evaluated(name)
            n = len(ev.seeds) if final else ev.row
            images, emb = self._generate(method, sampler, name, n)
            ia = image_alignments(emb, ev.refs)
            labels = nearest_concepts(emb, references, ev.class_images)
            per_image = {
                "ia": ia,
                "nia": ia / ev.ref_ia,
                "ca": torch.tensor([float(label == name) for label in labels]),
                "ta": text_alignments(emb, ev.class_texts_emb[:n]),
            }
            if self.dino is not None:
                per_image["dino"] = image_alignments(self.dino.image_embeds(images), ev.refs_dino)
            scores: dict[str, Any] = {k: float(v.mean()) for k, v in per_image.items()}
            scores["samples"] = {
                "seed": ev.seeds[:n],
                **{k: _rounded(v) for k, v in per_image.items()},
                "label": labels,
            }
            out[name] = scores
            if save_grid is not None:
                from fl2t.images import image_grid

                save_grid.mkdir(parents=True, exist_ok=True)
                grid = image_grid(images[:16], columns=8, scale=max(1, 96 // images[0].width))
                grid.save(save_grid / f"{name}.png")
        return out

    def _generate(
        self, method: Method, sampler: Sampler | None, name: str, n: int
    ) -> tuple[list[Image.Image], torch.Tensor]:
        """A concept's first `n` evaluation images under the method's current model, and their CLIP embeddings
        (n, D). A method that samples each concept alone (sampler None: it gives one per concept) has the same model
        of a concept after every task: its images are generated once (the final row's extra ones when it comes)."""
        key = (str(method.ctx.workdir), name)
        images, emb = self._per_concept.get(key, ([], None)) if method.samples_per_concept else ([], None)
        if len(images) < n:
            ev, s = self.evaluated(name), self.cfg.sample
            sampler = self.sampler(method, name) if method.samples_per_concept else sampler
            more = sampler(ev.prompts[len(images) : n], ev.seeds[len(images) : n], s.steps, s.guidance, s.size)
            more_emb = self.clip.image_embeds(more)
            images, emb = images + more, more_emb if emb is None else torch.cat([emb, more_emb])
            if method.samples_per_concept:
                self._per_concept[key] = (images, emb)
        return images[:n], emb[:n]

    def fidelity(self, method: Method, names: list[str]) -> dict[str, float]:
        """Each concept's fidelity (DESIGN §4) under the method's current model: how closely what it generates with
        reproduces the concept's expert learned alone, on that expert's anchors."""
        from fl2t.consolidate.fidelity import sampler_fidelity, targets

        by_name = {c.name: c for c in self.concepts}
        for name in names:
            if name not in self._targets:
                expert = self.store_learner().store_expert(by_name[name])
                self._targets[name] = targets(method.base_pipeline([expert]), [expert])[name]
        if method.samples_per_concept:
            return {n: sampler_fidelity(self.sampler(method, n), {n: self._targets[n]})[n] for n in names}
        return sampler_fidelity(self.sampler(method), {n: self._targets[n] for n in names})

    def multi(self, method: Method) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list]]]:
        """Two concepts in one prompt: per pair the mean of each per-image score and, per image (by seed, the same
        for every method), the scores: `nia`, the normalised IA against each concept's references, averaged; `ta`,
        the TA of the prompt with each concept's tokens replaced by its class word; and on the tiny world
        `presence`, 1 where the world's presence score (`fl2t.world.presence`) finds both concepts."""
        sampler = self.sampler(method)
        scores, samples = {}, {}
        for a, b in self.cfg.multi:
            if a not in self.names or b not in self.names:
                raise Fl2tError(f"multi-concept pair {a}+{b}: not concepts of this benchmark")
            ea, eb = self.evaluated(a), self.evaluated(b)
            kinds = "+".join(e.concept.spec.kind for e in (ea, eb))
            if kinds == "style+object":
                ea, eb, kinds = eb, ea, "object+style"
            template = self.cfg.multi_prompts.get(kinds)
            if template is None:
                raise Fl2tError(f"no multi_prompts template for a {kinds} pair")
            prompt = template.format(ea.concept.spec.subject, eb.concept.spec.subject)
            n = self.cfg.multi_images or max(4, self.cfg.final_images_per_prompt or self.cfg.images_per_prompt)
            s = self.cfg.sample
            seeds = [self.cfg.seed + 90_000 + i for i in range(n)]
            images = sampler([prompt] * n, seeds, s.steps, s.guidance, s.size)
            emb = self.clip.image_embeds(images)
            nia = 0.5 * (image_alignments(emb, ea.refs) / ea.ref_ia + image_alignments(emb, eb.refs) / eb.ref_ia)
            text = prompt
            for e in (ea, eb):
                text = class_prompt(text, e.concept.spec.tokens, e.concept.spec.class_word)
            ta = text_alignments(emb, self.clip.text_embeds([text]).expand(n, -1))
            got = {"nia": nia, "ta": ta}
            if self.presence is not None:
                names = [e.concept.spec.name for e in (ea, eb)]
                got["presence"] = torch.from_numpy(self.presence(images, names).all(axis=1).astype(np.float32))
            scores[f"{a}+{b}"] = {k: float(v.mean()) for k, v in got.items()}
            samples[f"{a}+{b}"] = {"seed": seeds, **{k: _rounded(v) for k, v in got.items()}}
        return scores, samples

    @cached_property
    def presence(self) -> Callable[[list[Image.Image], list[str]], np.ndarray] | None:
        """The tiny world's presence score, where the concepts are world concepts scored by the world's evaluator."""
        if not self.cfg.world or self.cfg.clip != "world":
            return None
        from fl2t.world.presence import Presence

        return Presence(self.clip)

    # -- results ------------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.cfg.name, "concepts": self.names, "orders": self.orders, "methods": {}}
        variants = {m: self.cfg.variants[m].model_dump() for m in self.methods if m in self.cfg.variants}
        if variants:  # what each variant row ran: its method and overrides
            out["variants"] = variants
        tasks = {m: [self.tasks(m, k) for k in range(len(self.orders))] for m in self.methods}
        for method in self.methods:
            runs = [self._run_result(tasks[method][k], order) for k, order in enumerate(self.orders)]
            averages = [r["average"]["nia"] for r in runs]
            per_concept = {n: {m: _mean([r["final"][n].get(m) for r in runs]) for m in METRICS} for n in self.names}
            out["methods"][method] = {
                "runs": runs,
                "per_concept": per_concept,
                "average": {m: _mean([r["average"][m] for r in runs]) for m in METRICS},
                "forgetting": {m: _mean([r["forgetting"].get(m) for r in runs]) for m in ("nia", "ia", "ca")},
                **{
                    f"multi{suffix}": _mean(
                        [_mean([p.get(key) for p in r["multi"].values()]) for r in runs if r["multi"]]
                    )
                    for key, suffix in MULTI.items()
                },
                "order_spread": float(max(averages) - min(averages)),
                "compute": method_compute(tasks[method], self.out),
            }
            # 95% bootstrap intervals over the (concept, prompt, seed) samples, the confusion matrix (bench/stats.py)
            out["methods"][method].update(method_stats(tasks[method], self.orders, self.names))
        out["comparisons"] = comparisons(tasks)
        if self.cfg.fidelity:
            out["fidelity_vs_ca"] = fidelity_vs_ca(out)
        return out

    def tasks(self, method: str, k: int) -> list[dict[str, Any]]:
        """The task files of a method's order k, in task order."""
        folder = self.method_dir(method, k)
        return [json.loads((folder / f"task{t}.json").read_text()) for t in range(len(self.names))]

    def _run_result(self, tasks: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
        """One method over one order, from its task files: R[t][i] per metric (None above the diagonal), the final
        row and its average, the average forgetting (on the samples common to every row, when the task files keep
        per-image scores) and the multi-concept scores."""
        R = {
            metric: [
                [tasks[t].get(name, {}).get(metric) if i <= t else None for i, name in enumerate(order)]
                for t in range(len(order))
            ]
            for metric in METRICS
        }
        final = tasks[-1]
        return {
            "order": order,
            "R": R,
            "final": {name: {k: v for k, v in final[name].items() if k != "samples"} for name in self.names},
            "average": {m: _mean([final[n].get(m) for n in self.names]) for m in METRICS},
            "forgetting": (
                {m: forgetting([tasks], [order], m) for m in FORGETTING}
                if has_samples([tasks])
                else {m: average_forgetting(R[m]) for m in FORGETTING if R[m][-1][0] is not None}
            ),
            "multi": _multi_scores(final.get("_multi")),
        }


MULTI = {"nia": "", "presence": "_presence", "ta": "_ta"}  # multi-concept scores -> their results keys' suffixes


def _multi_scores(multi: dict[str, Any] | None) -> dict[str, dict[str, float]] | None:
    """Per pair its scores; a task file written before the multi-concept score had several scores holds its nIA."""
    if not multi:
        return multi
    return {pair: v if isinstance(v, dict) else {"nia": v} for pair, v in multi.items()}


def fidelity_vs_ca(results: dict[str, Any], drop: float = DROP, resamples: int = 2000) -> dict[str, Any]:
    """How well fidelity tracks CA, over every (method, order, task, learned concept) entry of the methods other than
    the oracle: Spearman's rank correlation of fidelity with CA, and the AUC of predicting a CA drop of `drop` or
    more below the concept's CA under the oracle (its expert alone) by low fidelity; each with a 95% bootstrap
    interval over the entries. Empty without the oracle's run."""
    from scipy.stats import mannwhitneyu, spearmanr

    methods = results["methods"]
    if "oracle" not in methods:
        return {}
    fid, ca, lost = [], [], []
    for method, r in methods.items():
        if method == "oracle":
            continue
        for k, run in enumerate(r["runs"]):
            alone = methods["oracle"]["runs"][k]["final"]
            for t, row in enumerate(run["R"]["fidelity"]):
                for i, f in enumerate(row[: t + 1]):
                    c = run["R"]["ca"][t][i]
                    if f is not None and c is not None:
                        fid.append(f)
                        ca.append(c)
                        lost.append(alone[run["order"][i]]["ca"] - c >= drop - 1e-9)
    fid, ca, lost = np.array(fid), np.array(ca), np.array(lost, dtype=bool)
    out: dict[str, Any] = {"entries": len(fid), "lost": int(lost.sum()), "drop": drop}
    if len(fid) < 3:
        return {**out, "spearman": None, "spearman_95": None, "auc": None, "auc_95": None}

    def stats(idx: np.ndarray) -> tuple[float, float]:
        rho = spearmanr(fid[idx], ca[idx]).statistic
        a, b = fid[idx][lost[idx]], fid[idx][~lost[idx]]
        auc = mannwhitneyu(b, a).statistic / (len(a) * len(b)) if len(a) and len(b) else float("nan")
        return float(rho), float(auc)

    rng = np.random.default_rng(0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant resample has no rank correlation: nan, left out below
        point = stats(np.arange(len(fid)))
        boot = np.array([stats(rng.integers(0, len(fid), len(fid))) for _ in range(resamples)])
    for j, key in enumerate(("spearman", "auc")):
        ok = boot[:, j][np.isfinite(boot[:, j])]
        finite = np.isfinite(point[j]) and len(ok)
        out[key] = float(point[j]) if finite else None
        out[f"{key}_95"] = [float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))] if finite else None
    return out


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock` (released by the kernel if the process dies)."""
    fd = os.open(lock, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _weights_fingerprint(model: str) -> str | list:
    """A local folder: the name, size and modification time of each weights file (cheap at SD size); a hub id:
    itself."""
    root = Path(model).expanduser()
    if not root.is_dir():
        return model
    files = root.rglob("*.safetensors")
    return sorted([p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files)


def _rounded(values: torch.Tensor) -> list[float]:
    """Per-image scores as stored in a task file: 4 decimals keep the files small."""
    return [round(float(v), 4) for v in values]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def run_continual(
    config: str | Path | BenchConfig,
    methods: list[str],
    out: Path,
    progress: Callable[[], Any] | None,
    say: Callable[[str], None],
    *,
    as_json: bool = False,
    shard: tuple[int, int] | None = None,
    report_only: bool = False,
    **overrides: Any,
) -> dict[str, Any] | None:
    """Load the config (`overrides` replace its top-level keys; a BenchConfig is taken as it is), run every method
    over every order (resuming finished work, spread over torchrun's ranks or done as one `shard` of K/N), write
    results.json, report.md and report.html, and print the table. `report_only`: no work, the report of what the
    shards finished. Returns None for a worker that leaves the report to another."""
    from rich.console import Console
    from rich.table import Table

    from fl2t.bench.report import concept_notes, concept_table, reading, summary_table, write_report

    t0 = time.perf_counter()
    cfg = config if isinstance(config, BenchConfig) else load_config(config, **overrides)
    bench = Benchmark(cfg, out, methods, progress=progress, say=say)
    results = bench.report() if report_only else bench.run(shard)
    if results is None:
        left = [u.key for u in bench.units() if not bench.finished(u)]
        who = f"shard {shard[0]}/{shard[1]}" if shard else "this rank"
        say(f"{who}: done; {len(left)} unit(s) left to other workers; the report: `fl2t bench continual --report`")
        return None
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    (bench.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md, html_path = write_report(results, bench.out)
    if as_json:
        print(json.dumps(results, indent=2))
        return results
    console = Console(width=120)
    title = f"{cfg.name}: {len(bench.orders)} order(s), {len(bench.names)} tasks"
    for (header, rows), caption in ((summary_table(results), title), (concept_table(results), "final nIA per concept")):
        table = Table(title=caption)
        for h in header:
            table.add_column(h, justify="left" if h == "method" else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    for line in concept_notes(results)[:1] + reading(results):
        console.print(line, markup=False, highlight=False)
    print(f"report: {md} and {html_path}; results: {bench.out / 'results.json'} ({results['wall_s']:.0f} s)")
    return results
