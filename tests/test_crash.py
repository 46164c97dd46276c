"""A library survives writers killed at any moment, a second writer, and interrupted training (--resume)."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.library import Library

SETTINGS = "learn:\n  steps: 6\n  num_anchors: 1\n  anchor_steps: 1\n  checkpoint_every: 2\nconsolidate:\n  steps: 2\n"


def fl2t(args, env=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fl2t.cli", "-q", *map(str, args)], capture_output=True, text=True, env=env, **kw
    )


@pytest.fixture
def settings_file(tmp_path):
    p = tmp_path / "settings.yaml"
    p.write_text(SETTINGS)
    return p


@pytest.mark.parametrize("moment", ["step:3", "staged", "stored", "versioned", "parked", "renamed", "committed"])
def test_killed_replace_leaves_old_or_new_state_and_next_write_cleans_up(
    moment, library_copy, concepts_root, tiny_base, settings_file
):
    lib = Library(library_copy)
    old_hash = lib.manifest().experts["c-stripeball"]
    args = [
        "learn",
        concepts_root / "c-stripeball",
        "-l",
        library_copy,
        "--config",
        settings_file,
        "--replace",
        "--seed",
        "5",
    ]
    r = fl2t(args, env={"FL2T_KILL_AT": moment})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert lib.check() == []
    now = lib.manifest().experts["c-stripeball"]
    assert (now == old_hash) == (moment != "committed")
    lib.expert("c-stripeball")  # loads, hashes verified
    # the next writer finishes the job and leaves no debris
    lib.add(lib.expert("c-stripeball"), replace=True)
    assert lib.check() == [] and lib.names() == ["c-stripeball"]
    assert sorted(p.name for p in library_copy.iterdir() if p.name != ".checkpoints") == [
        ".lock",
        "experts",
        "history",
        "library.json",
    ]
    assert [v.number for v in lib.versions()] == ([1, 2, 3] if moment == "committed" else [1, 2])


def test_killed_first_write_of_a_new_library_leaves_a_valid_empty_library(
    tmp_path, concepts_root, tiny_base, settings_file
):
    lib_path = tmp_path / "new-lib"
    r = fl2t(
        ["learn", concepts_root / "c-checkbox", "-l", lib_path, "--base", tiny_base, "--config", settings_file],
        env={"FL2T_KILL_AT": "renamed"},
    )
    assert r.returncode == -signal.SIGKILL
    assert Library(lib_path).names() == [] and Library(lib_path).check() == []
    r = fl2t(["learn", concepts_root / "c-checkbox", "-l", lib_path, "--base", tiny_base, "--config", settings_file])
    assert r.returncode == 0, r.stderr
    assert Library(lib_path).names() == ["c-checkbox"]


def test_kill_from_outside_at_any_time_keeps_the_library_loadable(library_copy, concepts_root, settings_file):
    lib = Library(library_copy)
    args = [
        sys.executable,
        "-m",
        "fl2t.cli",
        "-q",
        "learn",
        concepts_root / "c-stripeball",
        "-l",
        library_copy,
        "--config",
        settings_file,
        "--replace",
        "--seed",
        "9",
    ]
    for delay in (1.0, 3.0, 6.0):
        proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert lib.check() == []
        lib.expert("c-stripeball")


def test_second_writer_is_stopped_with_a_clear_message(library_copy, concepts_root, settings_file):
    with open(library_copy / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = fl2t(["learn", concepts_root / "c-checkbox", "-l", library_copy, "--config", settings_file])
    assert r.returncode == 2
    assert r.stderr.strip().endswith("another fl2t process is writing it; wait for it to finish")
    assert Library(library_copy).names() == ["c-stripeball"]


def test_resume_after_kill_gives_the_weights_of_an_uninterrupted_run(tmp_path, concepts_root, tiny_base, settings_file):
    base_args = [concepts_root / "c-checkbox", "--base", tiny_base, "--config", settings_file, "--seed", "3"]
    assert fl2t(["learn", *base_args, "-l", tmp_path / "straight"]).returncode == 0
    interrupted = tmp_path / "interrupted"
    r = fl2t(["learn", *base_args, "-l", interrupted], env={"FL2T_KILL_AT": "step:5"})
    assert r.returncode == -signal.SIGKILL
    assert (interrupted / ".checkpoints" / "c-checkbox.safetensors").is_file()
    r = fl2t(["learn", *base_args, "-l", interrupted, "--resume"])
    assert r.returncode == 0, r.stderr
    a, b = Library(tmp_path / "straight").expert("c-checkbox"), Library(interrupted).expert("c-checkbox")
    assert max((a.lora[k] - b.lora[k]).abs().max().item() for k in a.lora) <= 1e-6
    assert (a.token_embeddings - b.token_embeddings).abs().max().item() <= 1e-6
    # --resume again: nothing left to do
    r = fl2t(["learn", *base_args, "-l", interrupted, "--resume"])
    assert r.returncode == 0 and not (interrupted / ".checkpoints" / "c-checkbox.safetensors").exists()


@pytest.mark.parametrize("moment", ["consolidated-staged", "stored", "versioned", "parked", "renamed", "committed"])
def test_killed_consolidate_leaves_the_old_or_the_new_version(moment, tmp_path, consolidated_library):
    shutil.copytree(consolidated_library, tmp_path / "lib")
    lib = Library(tmp_path / "lib")
    version = lib.current().number
    old = (tmp_path / "lib" / "consolidated" / "model.safetensors").read_bytes()
    r = fl2t(
        ["consolidate", "-l", tmp_path / "lib", "--learned", "--steps", "2", "--seed", "1"],
        env={"FL2T_KILL_AT": moment},
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert lib.check() == []
    committed = moment == "committed"
    assert lib.current().number == version + committed
    now = (lib.consolidated_dir() / "model.safetensors").read_bytes()  # old or new, hash-checked
    assert (now != old) == committed
    FL2TPipeline.from_pretrained(library=lib)  # loads: the consolidated model matches the set
    lib.add(lib.expert("c-stripes"), replace=True)  # the next writer finishes or undoes the rest
    assert (tmp_path / "lib" / "consolidated" / "model.safetensors").read_bytes() == now
    listing = sorted(p.name for p in (tmp_path / "lib").iterdir())
    assert listing == [".lock", "consolidated", "experts", "history", "library.json"]
