"""What the web app does, as plain Python over one library: no Gradio here, and no method of its own.

Every action calls the functions the command line calls (`fl2t.learning` for learn and forget, the pipelines for
generation, `fl2t.export`, `fl2t.bench.report`) and turns their results into what a page shows: cards, images,
a heat map, a table. Errors a user can cause arrive as `Fl2tError`; the page shows their message.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fl2t.bench.report import plots, table_rows
from fl2t.config import Settings, load_settings
from fl2t.consolidate.common import concepts_named
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.data import Concept
from fl2t.errors import Cancelled, Fl2tError
from fl2t.export import FORMATS, export_expert
from fl2t.learning import Learned, check_can_learn, choose_base, forget, learn, load_concepts
from fl2t.library import Library
from fl2t.models import load_base
from fl2t.pipeline import ExpertPipeline
from fl2t.world import write_concepts

THUMB = 96  # pixels a side of a card's thumbnails
Gallery = list[tuple[Image.Image, str]]  # (image, caption)


def cache_dir() -> Path:
    """Where the app keeps what it can rebuild: uploads, thumbnails, exports, plots."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fl2t" / "ui"


@dataclass
class Card:
    """One concept of the library, as its card shows it."""

    name: str
    tokens: list[str]
    class_word: str
    kind: str
    subject: str  # what a prompt writes to name it, e.g. "<my-dog> dog"
    learned: str  # when its expert was written
    rank: int
    steps: int | None
    fidelity: float | None  # how closely the consolidated library reproduces the expert (None: not measured)
    thumbnails: list[Image.Image]
    thumbnails_are: str  # "references" or "expert samples"


@dataclass
class Progress:
    """The latest state of a running learn: the step of the method, its count and timing."""

    label: str = "starting"
    done: int = 0
    total: int = 0
    info: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def stage(self) -> str:
        if self.label.startswith("learn "):
            return f"Step 1: learning {self.label.removeprefix('learn ')} alone"
        if self.label.startswith("consolidate"):
            return f"Step 2: consolidating ({self.label.removeprefix('consolidate ')})"
        return self.label

    @property
    def eta(self) -> float | None:
        elapsed = time.monotonic() - self.started
        return elapsed * (self.total - self.done) / self.done if 0 < self.done < self.total else None


class LearnJob:
    """One `learn` on a worker thread: progress, samples and the outcome for the page to poll.

    Samples: step 0 (the base model on the concept's prompt, before any training), after Step 1 (the expert
    alone: the anchors it generated, decoded) and after Step 2 (the consolidated library on the same prompt).
    """

    def __init__(self, ws: Workspace, concept: Concept, base_pipe: Any, settings: Settings):
        self.ws, self.concept, self.settings = ws, concept, settings
        self.base_pipe = base_pipe
        self.progress = Progress()
        self.samples: Gallery = []
        self.learned: Learned | None = None
        self.gate: str | None = None  # the regression gate's verdict on the new consolidation, in one line
        self.candidate: int | None = None  # the version the gate refused (kept, not current)
        self.error: str | None = None
        self.cancel = threading.Event()
        self.finished = threading.Event()
        self.version = 0  # bumped by the worker at every change
        self.thread = threading.Thread(target=self._run, name=f"learn-{concept.name}", daemon=True)

    def start(self) -> LearnJob:
        self.thread.start()
        return self

    def updates(self, every: float = 0.5) -> Iterator[None]:
        """Yields when something changed, at most every `every` seconds, and once more when the job is over."""
        seen = self.version
        while not self.finished.wait(every):
            if self.version != seen:
                seen = self.version
                yield None
        yield None

    def _changed(self) -> None:
        self.version += 1

    @contextmanager
    def _track(self, label: str, total: int) -> Iterator[Callable[..., None]]:
        self.progress = Progress(label=label, total=total)
        self._changed()

        def update(done: int, info: str = "") -> None:
            self.progress.done, self.progress.info = done, info
            self._changed()

        yield update

    def _run(self) -> None:
        try:
            self._learn()
        except Cancelled:
            self.error = "Cancelled: the library is as it was before."
        except Fl2tError as e:
            self.error = str(e)
        except Exception as e:  # shown in the page; the traceback goes to the server's log
            traceback.print_exc()
            self.error = f"internal error: {type(e).__name__}: {e}"
        finally:
            self.finished.set()
            self._changed()

    def _learn(self) -> None:
        spec = self.concept.spec
        with self._track("step 0: the base model before training", 1):
            baseline = spec.stable_prompt.replace(spec.subject, spec.class_word)  # the token starts as the class word
            self._sample("step 0 (base model)", self.ws.sample(self.base_pipe, baseline))
        self.base_pipe = None
        result = learn(
            [self.concept],
            self.ws.library,
            base=self.ws.base,
            learn_settings=self.settings.learn,
            consolidate_settings=self.settings.consolidate,
            track=self._track,
            on_learned=self._on_learned,
            cancel=self.cancel.is_set,
        )
        self.gate = result.gate
        if result.refused is not None:  # the current consolidation is still the old set's: nothing to sample
            self.candidate = result.refused.version
            self.error = f"{spec.name} is learned, but {result.refused}"
            return
        try:
            with self._track("sampling the consolidated library", 1):
                image = self.ws.generate_images(spec.stable_prompt, seed=0, n=1)[0]
            self._sample("after Step 2 (consolidated)", image)
        except Exception as e:  # the concept is learned; only its last sample is missing
            traceback.print_exc()
            self.error = f"{spec.name} is learned, but sampling the consolidated library failed: {e}"

    def _on_learned(self, learned: Learned) -> None:
        self.learned = learned
        self.ws.remember_references(learned.content_hash, self.concept.images)
        self._sample("after Step 1 (expert alone)", self.ws.expert_samples(learned.name)[0][0])

    def _sample(self, caption: str, image: Image.Image) -> None:
        self.samples.append((image, caption))
        self._changed()


class Workspace:
    """One library (and the base model to use with it), with what the app caches between requests."""

    def __init__(self, library: str | Path, base: str | None = None, config: str | Path | None = None):
        self.library = Path(library).expanduser().resolve()
        self.base = base
        self.config = config
        self.settings = load_settings(config)
        Library(self.library)  # a file, or a folder that is not a library, is refused now
        self.cache = cache_dir()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._pipes: dict[str, tuple[Any, Any]] = {}  # "fl2t" / "expert": (key, pipeline)
        self._decoder: tuple[str, Any, Any] | None = None  # (base id, its VAE, its image processor)
        # The cached pipelines are used by one request at a time: Gradio's queue runs one, and this lock covers a
        # learn's own samples too (its thread outlives the request when the browser goes away).
        self.models = threading.RLock()
        self.job: LearnJob | None = None
        self._export: Path | None = None  # the folder of the last export's zip

    # -- the library's cards --------------------------------------------------------------------------------
    def lib(self) -> Library:
        return Library(self.library)

    def base_id(self) -> str:
        return choose_base(self.lib(), self.base)

    def cards(self) -> list[Card]:
        lib = self.lib()
        if not lib.exists:
            return []
        cards = []
        fidelity = lib.fidelity()
        for name, rec in lib.records().items():
            thumbs = self._thumbnails("references", rec.content_hash)
            what = "references"
            if not thumbs:
                thumbs, what = [im for im, _ in self.expert_samples(name)], "expert samples"
            learned = datetime.fromtimestamp((lib.expert_dir(name) / "expert.json").stat().st_mtime)
            steps = rec.settings.get("steps")
            cards.append(
                Card(
                    name=name,
                    tokens=rec.tokens,
                    class_word=rec.class_word,
                    kind=rec.kind,
                    subject=rec.spec.subject,
                    learned=learned.strftime("%Y-%m-%d %H:%M"),
                    rank=rec.rank,
                    steps=steps if isinstance(steps, int) else None,
                    fidelity=fidelity.get(name),
                    thumbnails=[_thumbnail(im) for im in thumbs[:4]],
                    thumbnails_are=what,
                )
            )
        return cards

    def remember_references(self, content_hash: str, images: Sequence[Image.Image]) -> None:
        """Keep small copies of a concept's reference images for its card (the library keeps only weights)."""
        folder = self.cache / "references" / content_hash
        folder.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images[:4]):
            _thumbnail(im).save(folder / f"{i:02d}.png")

    def _thumbnails(self, kind: str, content_hash: str) -> list[Image.Image]:
        folder = self.cache / kind / content_hash
        return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))] if folder.is_dir() else []

    def expert_samples(self, name: str) -> Gallery:
        """The expert alone: the images it generated for Step 2 (its anchors), decoded; with their prompts."""
        lib = self.lib()
        expert = lib.expert(name)
        cached = self._thumbnails("samples", expert.content_hash)
        if len(cached) != len(expert.anchor_prompts):
            with self.models, torch.no_grad():  # the anchors are latents as the pipeline returns them: scaled
                vae, processor = self.decoder()
                pixels = vae.decode(expert.anchors.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
            cached = processor.postprocess(pixels, output_type="pil")
            folder = self.cache / "samples" / expert.content_hash
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(cached):
                im.save(folder / f"{i:02d}.png")
        return list(zip(cached, expert.anchor_prompts))

    def decoder(self) -> tuple[Any, Any]:
        """The base model's VAE and image processor (the rest of the base is not kept)."""
        base_id = self.base_id()
        if self._decoder is None or self._decoder[0] != base_id:
            pipe = load_base(base_id, device=self.device)
            self._decoder = (base_id, pipe.vae, pipe.image_processor)
        return self._decoder[1], self._decoder[2]

    def example_folder(self, name: str) -> Path:
        """A tiny-world concept's folder (written once into the cache), to learn as an example."""
        examples = self.cache / "examples"
        if not (examples / name / "concept.yaml").is_file():
            write_concepts(examples)
        if not (examples / name).is_dir():
            raise Fl2tError(f"the tiny world has no concept named {name!r}")
        return examples / name

    # -- learn, forget, export ------------------------------------------------------------------------------
    def start_learn(
        self,
        uploads: Sequence[str | Path] | None,
        folder: str | None,
        *,
        name: str | None = None,
        tokens: str | None = None,
        class_word: str | None = None,
        kind: str | None = None,
        steps: int | None = None,
        consolidate_steps: int | None = None,
    ) -> LearnJob:
        """Check everything that can be refused before training (files, name, tokens, library, base), then
        learn on a worker thread. Refusals raise `Fl2tError` here, and the library is not touched."""
        uploads = [Path(p) for p in uploads or []]
        folder = (folder or "").strip() or None
        if uploads and folder:
            raise Fl2tError("give the concept's images by upload or as a folder, not both")
        if not uploads and not folder:
            raise Fl2tError("no images: drop 3-20 pictures of the concept, or give a folder of them")
        settings = load_settings(
            self.config,
            learn={"steps": int(steps) if steps else None},
            consolidate={"steps": int(consolidate_steps) if consolidate_steps else None},
        )
        name = (name or "").strip() or None
        if self.job is not None and not self.job.finished.is_set():
            raise Fl2tError("a concept is being learned; wait for it to finish, or cancel it")
        source = Path(folder).expanduser() if folder else self._stage_uploads(uploads, name)
        try:
            (concept,) = load_concepts(
                [source],
                settings.learn,
                name=name,
                tokens=(tokens or "").split() or None,
                class_word=(class_word or "").strip() or None,
                kind=kind or None,
            )
        except Fl2tError as e:
            if folder:
                raise
            # the staging folder means nothing to the person who dropped the files: name the files alone
            raise Fl2tError(str(e).replace(f"{source}/", "").replace(str(source), "the uploaded images")) from None
        finally:
            if not folder:  # the images are in memory now
                shutil.rmtree(source, ignore_errors=True)
        lib = self.lib()
        base_id = choose_base(lib, self.base)
        base_pipe = check_can_learn(lib, [concept], base_id, replace=False).to(self.device)
        self._decoder = (base_id, base_pipe.vae, base_pipe.image_processor)  # for the samples of Step 1
        self.job = LearnJob(self, concept, base_pipe, settings).start()
        return self.job

    def _stage_uploads(self, uploads: list[Path], name: str | None) -> Path:
        if not name:
            raise Fl2tError("name: give the concept a name, e.g. my-dog")
        folder = (self.cache / "uploads" / uuid.uuid4().hex).resolve()
        folder.mkdir(parents=True)
        for p in uploads:
            shutil.copyfile(p, folder / Path(p).name)
        return folder

    def cancel_learning(self) -> bool:
        """Ask the running learn to stop; it puts the library back as it was. False: nothing is running."""
        if self.job is None or self.job.finished.is_set():
            return False
        self.job.cancel.set()
        return True

    def make_current(self, version: int) -> None:
        """Make a version the regression gate refused current after all (as `fl2t library rollback LIB N`)."""
        self.lib().rollback(version)

    def forget(self, name: str) -> str | None:
        """Remove a concept and re-consolidate the rest (as `fl2t forget`)."""
        return forget(name, self.library, self.settings.consolidate)

    def export_zip(self, name: str, format: str) -> Path:
        """A zip of the concept's expert exported as `format` (diffusers or kohya), for download."""
        if format not in FORMATS:
            raise Fl2tError(f"export format {format!r} is not known; use one of: {', '.join(FORMATS)}")
        if self._export is not None:  # the page has its copy of the previous zip by now
            shutil.rmtree(self._export, ignore_errors=True)
        work = self._export = Path(tempfile.mkdtemp(prefix="fl2t-export-"))  # the server hands out temp-dir files
        out = export_expert(self.lib().expert(name), work / f"{name}-{format}", format=format)  # type: ignore[arg-type]
        archive = shutil.make_archive(str(work / f"{name}-{format}"), "zip", root_dir=work, base_dir=out.name)
        shutil.rmtree(out)
        return Path(archive)

    # -- generate ---------------------------------------------------------------------------------------------
    def _pipe(self, kind: str, concept: str | None = None) -> Any:
        """The consolidated pipeline ("fl2t"), or one concept's expert alone ("expert"), kept while the library
        (its experts and its consolidated model) is unchanged."""
        lib = self.lib()
        consolidated = lib.path / "consolidated"
        key = (
            tuple(sorted(lib.manifest().experts.items())),
            consolidated.stat().st_mtime_ns if consolidated.exists() else None,
            self.base,
            concept,
        )
        cached = self._pipes.get(kind)
        if cached and cached[0] == key:
            return cached[1]
        self._pipes.pop(kind, None)  # free the old one before loading the next
        if kind == "fl2t":
            pipe = FL2TPipeline.from_pretrained(self.base, library=lib, device=self.device)
        else:
            pipe = ExpertPipeline.from_library(lib, concept, base=self.base, device=self.device)
        self._pipes[kind] = (key, pipe)
        return pipe

    def sample(self, pipe: Any, prompt: str, seed: int = 0, steps: int | None = None) -> Image.Image:
        """One image of `prompt` from `pipe`, at the settings the learn previews use."""
        steps = steps or self.settings.learn.anchor_steps
        return pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=self.settings.learn.anchor_guidance,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]

    def generate_images(
        self,
        prompt: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        n: int = 1,
        concept: str | None = None,
    ) -> list[Image.Image]:
        """Images of `prompt` from the consolidated library, or from one concept's expert alone (as `fl2t
        generate`); a seed per call, as the command line's."""
        if not prompt.strip():
            raise Fl2tError("the prompt is empty: write one, e.g. 'a photo of <my-dog> dog on a beach'")
        with self.models:
            pipe = self._pipe("expert", concept) if concept else self._pipe("fl2t")
            return pipe(
                prompt,
                num_inference_steps=int(steps or self.settings.learn.anchor_steps),
                guidance_scale=self.settings.learn.anchor_guidance if guidance is None else float(guidance),
                num_images_per_prompt=int(n),
                generator=torch.Generator().manual_seed(int(seed)),
            ).images

    def relevance(self, prompt: str) -> tuple[list[str], list[str], list[list[float]]]:
        """The prompt's weight for each concept (and "none") per UNet block: (blocks, columns, rows), each row the
        mean over the block's adapted layers, as `fl2t inspect` shows it."""
        with self.models:
            pipe = self._pipe("fl2t")
            columns = [*pipe.concept_names, "none"]
            relevance = pipe.relevance(prompt)
        blocks: dict[str, list[dict[str, float]]] = {}
        for layer, weights in relevance.items():
            blocks.setdefault(".".join(layer.split(".")[:3]), []).append(weights)  # e.g. down_blocks.0.attentions
        rows = [[sum(w[c] for w in ws) / len(ws) for c in columns] for ws in blocks.values()]
        return list(blocks), columns, rows

    def named_concepts(self, prompt: str) -> list[str]:
        """The library's concepts whose tokens the prompt contains."""
        with self.models:
            pipe = self._pipe("fl2t")
            share = concepts_named(pipe, pipe.experts, [prompt])[0].tolist()
        return [n for n, s in zip(pipe.concept_names, share) if s >= 1.0]

    # -- benchmark runs ---------------------------------------------------------------------------------------
    def open_benchmark(self, folder: str | Path) -> tuple[list[str], list[list[str]], Gallery, Gallery]:
        """A benchmark run folder's table, plots (forgetting curves, R heat maps) and sample grids, as its
        report.html shows them."""
        run = Path(str(folder).strip()).expanduser()
        results_file = run / "results.json"
        if not results_file.is_file():
            raise Fl2tError(f"{run}: no results.json; give a folder `fl2t bench continual` or `fl2t demo` wrote")
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
            header, rows = table_rows(results)
        except (ValueError, KeyError, TypeError) as e:
            raise Fl2tError(f"{results_file}: not a benchmark results file ({type(e).__name__}: {e})") from None
        out = self.cache / "plots" / uuid.uuid4().hex
        pngs = plots(results, out)
        figures = [(Image.open(p).convert("RGB"), p.stem) for p in pngs]
        shutil.rmtree(out, ignore_errors=True)
        grids = [
            (Image.open(g).convert("RGB"), f"{g.parts[-4]} · {g.stem}")
            for g in sorted(run.glob("*/order0/grids/*.png"))
        ]
        return header, rows, figures, grids


def _thumbnail(im: Image.Image) -> Image.Image:
    """A square-ish thumbnail THUMB pixels on its longer side; small images are enlarged without blurring."""
    im = im.convert("RGB")
    scale = THUMB / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
