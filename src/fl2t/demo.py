"""`fl2t demo`: learn two concepts into a library, generate with each, export one for plain diffusers.

It runs on a tiny random-init SD-architecture model built on the spot: it exercises every code path of
Step 1, the library, generation and export in about a minute on a CPU, but the pictures mean nothing until
the pretrained tiny world replaces this base.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from PIL import Image, ImageDraw

from fl2t.config import LearnSettings
from fl2t.data import load_concept
from fl2t.experts import learn_expert
from fl2t.export import export_expert
from fl2t.library import Library
from fl2t.models import tiny_random_pipeline
from fl2t.pipeline import ExpertPipeline


CLASS_WORDS = {"stripes": "ball", "checks": "box", "rings": "ring", "dots": "triangle"}


def write_demo_concept(folder: Path, name: str, pattern: str, n: int = 4) -> Path:
    """A small synthetic concept: a shape with a pattern on varied backgrounds, with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (32, 32), [(30, 60, 160), (40, 140, 60), (200, 200, 200), (90, 30, 90)][i % 4])
        d = ImageDraw.Draw(im)
        box = (4 + i, 4 + i // 2, 27 - i // 2, 27)
        if pattern == "stripes":
            d.ellipse(box, fill=(230, 40, 40))
            for y in range(box[1], box[3], 4):
                d.line((box[0], y, box[2], y), fill=(250, 220, 30), width=2)
        elif pattern == "rings":
            for k, c in enumerate([(40, 200, 220), (250, 250, 250)] * 2):
                d.ellipse((box[0] + 2 * k, box[1] + 2 * k, box[2] - 2 * k, box[3] - 2 * k), outline=c, width=2)
        elif pattern == "dots":
            d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=(250, 150, 20))
            for x in range(box[0] + 3, box[2] - 2, 5):
                d.point((x, box[3] - 3), fill=(0, 0, 0))
        else:
            d.rectangle(box, fill=(250, 250, 250))
            for x in range(box[0], box[2], 6):
                for y in range(box[1] + (x // 6) % 2 * 3, box[3], 6):
                    d.rectangle((x, y, x + 2, y + 2), fill=(10, 10, 10))
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of <{name}> {CLASS_WORDS[pattern]}\n")
    (folder / "concept.yaml").write_text(
        yaml.safe_dump({"name": name, "tokens": [f"<{name}>"], "class_word": CLASS_WORDS[pattern], "kind": "object"})
    )
    return folder


def run_demo(out: Path, steps: int, progress: Callable, say: Callable[[str], None]) -> None:
    say("[bold]fl2t demo[/bold] on a tiny random-init SD-architecture model (not pretrained: the images are noise-like; "
        "the code paths are the real ones)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    base = out / "base"
    tiny_random_pipeline(seed=0).save_pretrained(base, safe_serialization=True)
    concepts = [write_demo_concept(out / "concepts" / n, n, p) for n, p in (("c-stripeball", "stripes"), ("c-checkbox", "checks"))]
    lib = Library(out / "library")
    settings = LearnSettings(steps=steps, lr=1e-3, embedding_lr=5e-3, num_anchors=2, anchor_steps=10)
    for folder in concepts:
        concept = load_concept(folder)
        with progress() as bar:
            task = bar.add_task(f"learn {concept.name}", total=steps, info="")
            expert = learn_expert(concept, str(base), settings, on_step=lambda i, loss: bar.update(task, advance=1, info=f"loss {loss:.4f}"))
        lib.add(expert)
        say(f"learned {concept.name} -> {lib.path / 'experts' / concept.name}")
    images = []
    for name in lib.names():
        pipe = ExpertPipeline.from_library(lib, name)
        spec = lib.expert(name).spec
        images += pipe(spec.stable_prompt, num_inference_steps=20, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images
    grid = Image.new("RGB", (32 * 4, 32 * len(lib.names())))
    for i, im in enumerate(images):
        grid.paste(im, (32 * (i % 4), 32 * (i // 4)))
    grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST).save(out / "samples.png")
    exported = export_expert(lib.expert(lib.names()[0]), out / "export")
    print(f"library: {lib.path} ({len(lib.names())} concepts: {', '.join(lib.names())})")
    print(f"samples: {out / 'samples.png'}")
    print(f"export:  {exported} (plain diffusers LoRA + textual inversion)")
    print(f"done in {time.perf_counter() - start:.0f} s")
