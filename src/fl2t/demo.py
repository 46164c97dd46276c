"""`fl2t demo`: the main job on the built-in default, the tiny world.

Three of the world's concepts (two objects and a style) are learned one at a time into a library (Step 1),
consolidated (Step 2), and generated together from one FL2TPipeline; one is exported for plain diffusers.
About a minute or two on a 2-core CPU.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.consolidate import consolidate, save_consolidated
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.data import load_concept
from fl2t.experts import learn_expert
from fl2t.export import export_expert
from fl2t.library import Library


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
