"""Shared, session-scoped fixtures: a tiny random-init base pipeline on disk and one learned library."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fl2t.config import ConsolidateSettings, LearnSettings
from fl2t.consolidate import consolidate, save_consolidated
from fl2t.data import load_concept
from fl2t.demo import write_demo_concept
from fl2t.experts import learn_expert
from fl2t.library import Library
from fl2t.models import tiny_random_pipeline


STEP2 = ConsolidateSettings(steps=6, batch_size=4)
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
    save_consolidated(lib, *consolidate(lib, STEP2))
    return lib.path
