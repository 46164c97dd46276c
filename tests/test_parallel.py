"""Step 1 over several processes: `torchrun` on CPU, concept-parallel and data-parallel."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl2t.config import LearnSettings
from fl2t.data import load_concept
from fl2t.experts import learn_expert
from fl2t.library import Library
from fl2t.parallel import my_concepts

SETTINGS = "learn:\n  steps: 4\n  num_anchors: 1\n  anchor_steps: 1\nconsolidate:\n  steps: 2\n"
# One thread per process, in the reference run too: two ranks fit on two cores, and the sums inside a matmul
# are grouped the same way in every run, so the experts can be compared byte for byte.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fl2t_learn(args: list, nproc: int = 1) -> subprocess.CompletedProcess:
    """`fl2t -q learn ARGS` in one plain process, or under `torchrun --nproc_per_node NPROC`."""
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launch, "-m", "fl2t.cli", "-q", "learn", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture
def settings_file(tmp_path) -> Path:
    p = tmp_path / "settings.yaml"
    p.write_text(SETTINGS)
    return p


def test_concepts_are_dealt_round_robin(concepts_root):
    a, b = (load_concept(concepts_root / n) for n in ("c-stripeball", "c-checkbox"))
    concepts = [a, b, b, a]
    assert [my_concepts(concepts, r, 3) for r in range(3)] == [[a, a], [b], [b]]
    assert my_concepts(concepts, 0, 1) == concepts


def test_concept_parallel_library_equals_the_one_learned_in_one_process(
    tmp_path, tiny_base, concepts_root, settings_file
):
    dirs = [concepts_root / "c-stripeball", concepts_root / "c-checkbox"]
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the reference: one process, one concept after the other (in this one, to save a start-up)
        for d in dirs:
            Library(one).add(
                learn_expert(load_concept(d), str(tiny_base), LearnSettings(steps=4, num_anchors=1, anchor_steps=1))
            )
    finally:
        torch.set_num_threads(threads)
    r = fl2t_learn([*dirs, "-l", two, "--base", tiny_base, "--config", settings_file], nproc=2)
    assert r.returncode == 0, r.stderr
    # The main process wrote both, in the given order, once; c-checkbox was learned by process 1.
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("learned ")] == [
        "c-stripeball",
        "c-checkbox",
    ]
    assert r.stderr.count("fl2t: error") == 0
    assert (
        json.loads((one / "library.json").read_text())["experts"]
        == json.loads((two / "library.json").read_text())["experts"]
    )  # content hashes
    for name in ("c-stripeball", "c-checkbox"):
        for f in ("lora.safetensors", "embeddings.safetensors", "anchors.safetensors", "expert.json"):
            assert (one / "experts" / name / f).read_bytes() == (two / "experts" / name / f).read_bytes(), (name, f)
    assert Library(two).check() == []
    assert not list(two.glob(".staging-*"))  # the staging folder is gone


def test_data_parallel_learns_one_concept_into_a_loadable_library(tmp_path, tiny_base, concepts_root, settings_file):
    lib = tmp_path / "lib"
    r = fl2t_learn(
        [concepts_root / "c-checkbox", "-l", lib, "--base", tiny_base, "--config", settings_file, "--data-parallel"],
        nproc=2,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("learned c-checkbox") == 1
    library = Library(lib)
    assert library.names() == ["c-checkbox"] and library.check() == []
    expert = library.expert("c-checkbox")
    assert any(v.abs().max() > 0 for k, v in expert.lora.items() if k.endswith("lora_B.weight"))


def test_a_user_error_is_reported_once_and_nothing_is_written(tmp_path, tiny_base, concepts_root, settings_file):
    lib = tmp_path / "lib"
    r = fl2t_learn(
        [
            concepts_root / "c-checkbox",
            concepts_root / "nope",
            "-l",
            lib,
            "--base",
            tiny_base,
            "--config",
            settings_file,
        ],
        nproc=2,
    )
    assert r.returncode != 0
    assert r.stderr.count("fl2t: error: ") == 1 and "no such concept folder" in r.stderr, r.stderr
    assert not lib.exists()
