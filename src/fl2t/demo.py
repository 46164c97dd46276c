"""`fl2t demo`: the main job on the built-in default, the tiny world.

Three of the world's concepts (two objects and a style) are learned one at a time into a library (Step 1),
consolidated (Step 2), and generated together from one FL2TPipeline; one is exported for plain diffusers.
About a minute or two on a 2-core CPU. `write_demo_concept` draws small synthetic concepts for the tests.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from PIL import Image, ImageDraw

from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.consolidate import consolidate, save_consolidated
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.data import load_concept
from fl2t.experts import learn_expert
from fl2t.export import export_expert
from fl2t.library import Library


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


DEMO_CONCEPTS = ("stripestar", "checkdiamond", "pastel")


def run_demo(out: Path, steps: int, progress: Callable, say: Callable[[str], None], consolidate_steps: int = 100) -> None:
    from fl2t.world import base_path, get_concept
    from fl2t.world.concepts import write_concept

    say("[bold]fl2t demo[/bold] on the tiny world (a 32x32 text-to-image world shipped with fl2t)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    base = base_path()
    (out / "concepts").mkdir()
    concepts = [write_concept(get_concept(n), out / "concepts") for n in DEMO_CONCEPTS]
    lib = Library(out / "library")
    settings = LearnSettings(steps=steps)
    for folder in concepts:
        concept = load_concept(folder)
        with progress() as bar:
            task = bar.add_task(f"learn {concept.name}", total=steps, info="")
            expert = learn_expert(concept, str(base), settings, on_step=lambda i, loss: bar.update(task, completed=i + 1, info=f"loss {loss:.4f}"))
        lib.add(expert)
        say(f"learned {concept.name} -> {lib.path / 'experts' / concept.name}")
    with progress() as bar:
        task = bar.add_task("consolidate", total=consolidate_steps, info="")
        save_consolidated(lib, *consolidate(lib, ConsolidateSettings(steps=consolidate_steps), on_step=lambda i, loss: bar.update(task, completed=i + 1, info=f"loss {loss:.4f}")))
    say(f"consolidated {len(lib.names())} concepts -> {lib.path / 'consolidated'}")
    pipe = FL2TPipeline.from_pretrained(library=lib)
    prompts = [lib.expert(name).spec.stable_prompt for name in lib.names()]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images
    grid = Image.new("RGB", (32 * 4, 32 * len(prompts)))
    for i, im in enumerate(images):
        grid.paste(im, (32 * (i % 4), 32 * (i // 4)))
    grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST).save(out / "samples.png")
    exported = export_expert(lib.expert(lib.names()[0]), out / "export")
    print(f"library: {lib.path} ({len(lib.names())} concepts: {', '.join(lib.names())})")
    print(f"samples: {out / 'samples.png'} (rows: {'; '.join(prompts)})")
    print(f"export:  {exported} (plain diffusers LoRA + textual inversion)")
    print(f"done in {time.perf_counter() - start:.0f} s")
