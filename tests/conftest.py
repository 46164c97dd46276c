"""Shared, session-scoped fixtures: a tiny random-init base pipeline on disk, synthetic concepts, learned libraries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.consolidate import consolidate
from fl2t.data import load_concept
from fl2t.experts import learn_expert
from fl2t.library import Library
from fl2t.models import tiny_random_pipeline

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


STEP2 = ConsolidateSettings(relevance="learned", steps=6, batch_size=4, pair_anchors=2, pair_anchor_steps=2)
# Few steps; the default LoRA lr and a high embedding lr, so the expert moves measurably in seconds.
FAST = LearnSettings(steps=12, lr=1e-4, embedding_lr=3e-2, num_anchors=2, anchor_steps=2)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    tiny_random_pipeline(seed=0).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def concepts_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("concepts")
    write_demo_concept(root / "c-stripeball", "c-stripeball", "stripes")
    write_demo_concept(root / "c-checkbox", "c-checkbox", "checks")
    return root


@pytest.fixture(scope="session")
def learned_library(tmp_path_factory, tiny_base, concepts_root) -> Path:
    """A library with one expert (c-stripeball). Tests copy it before changing it."""
    lib = Library(tmp_path_factory.mktemp("lib") / "library")
    lib.add(learn_expert(load_concept(concepts_root / "c-stripeball"), str(tiny_base), FAST))
    return lib.path


@pytest.fixture
def library_copy(learned_library, tmp_path) -> Path:
    dst = tmp_path / "library"
    shutil.copytree(learned_library, dst)
    return dst


@pytest.fixture(scope="session")
def four_experts(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("four")
    settings = FAST.model_copy(update={"steps": 4})
    return [
        learn_expert(load_concept(write_demo_concept(root / f"c-{p}", f"c-{p}", p)), str(tiny_base), settings)
        for p in ("stripes", "checks", "rings", "dots")
    ]


@pytest.fixture(scope="session")
def consolidated_library(tmp_path_factory, four_experts):
    lib = Library(tmp_path_factory.mktemp("cons") / "library")
    for e in four_experts[:2]:
        lib.add(e)
    lib.save_consolidated(consolidate(lib, STEP2).save_pretrained)
    return lib.path
