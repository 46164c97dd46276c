"""fl2t.learning: the one learn/consolidate/forget path of the CLI, the web app and the Python API; and the console's
progress in a log."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import FAST, STEP2
from fl2t import console
from fl2t.errors import Cancelled, Fl2tError
from fl2t.learning import learn
from fl2t.library import Library

QUICK = FAST.model_copy(update={"steps": 3, "num_anchors": 1, "anchor_steps": 2})


def tree_digest(path: Path) -> dict[str, str]:
    """The current version's files (experts and consolidated model) with their sha256, and its version number; the
    history keeps the cancelled call's versions, which is what history is for."""
    files = {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for sub in ("experts", "consolidated")
        for p in sorted((path / sub).rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    }
    current = Library(path).current()
    return {**files, "version": str(current.number if current else None)}


def cancel_after(n: int):
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > n

    return cancel


def test_learn_adds_the_concept_and_consolidates(tmp_path, tiny_base, concepts_root):
    result = learn(
        [concepts_root / "c-checkbox"],
        tmp_path / "lib",
        base=str(tiny_base),
        learn_settings=QUICK,
        consolidate_settings=STEP2.model_copy(update={"steps": 2}),
    )
    assert [x.name for x in result.learned] == ["c-checkbox"]
    assert Library(tmp_path / "lib").names() == ["c-checkbox"]
    assert result.set_hash and (tmp_path / "lib" / "consolidated").is_dir()


@pytest.mark.parametrize("stop_in", ["step1", "step2"])
def test_a_cancelled_learn_leaves_the_library_as_it_was(tmp_path, tiny_base, concepts_root, library_copy, stop_in):
    before = tree_digest(library_copy)
    # Step 1 asks the signal once per step; past its 3 steps, the next asks come from Step 2.
    cancel = cancel_after(1 if stop_in == "step1" else QUICK.steps + 1)
    with pytest.raises(Cancelled):
        learn(
            [concepts_root / "c-checkbox"],
            library_copy,
            base=str(tiny_base),
            learn_settings=QUICK,
            consolidate_settings=STEP2,
            cancel=cancel,
        )
    assert tree_digest(library_copy) == before
    assert Library(library_copy).names() == ["c-stripeball"]


def test_a_cancelled_replace_puts_the_old_expert_back_byte_identical(tmp_path, tiny_base, concepts_root, library_copy):
    before = tree_digest(library_copy)
    with pytest.raises(Cancelled):
        learn(
            [concepts_root / "c-stripeball"],
            library_copy,
            base=str(tiny_base),
            learn_settings=QUICK,
            consolidate_settings=STEP2,
            replace=True,
            cancel=cancel_after(QUICK.steps + 1),
        )
    assert tree_digest(library_copy) == before


def test_learn_refuses_two_folders_with_one_name_before_training(tmp_path, tiny_base, concepts_root):
    twin = tmp_path / "twin"
    shutil.copytree(concepts_root / "c-checkbox", twin)
    with pytest.raises(Fl2tError, match="also used by"):
        learn([concepts_root / "c-checkbox", twin], tmp_path / "lib", base=str(tiny_base), learn_settings=QUICK)
    assert not (tmp_path / "lib" / "library.json").exists()


def test_progress_in_a_log_is_a_plain_line_every_few_seconds(capsys, monkeypatch):
    """stderr is not a terminal under pytest: a live bar would stay silent; plain lines reach the log."""
    assert not console.console.is_terminal
    monkeypatch.setattr(console, "PLAIN_EVERY_S", 0.0)
    clock = iter(range(100))
    monkeypatch.setattr(console.time, "monotonic", lambda: float(next(clock)))
    with console.track("learn dog", 4) as update:
        for i in range(4):
            update(i + 1, f"loss {0.5 / (i + 1):.3f}")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("learn dog")]
    assert len(lines) == 4
    assert lines[1].startswith("learn dog: 2/4 (50%)") and "eta" in lines[1] and "loss 0.250" in lines[1]
    assert lines[-1].startswith("learn dog: 4/4 (100%)")


def test_quiet_console_prints_no_progress(capsys, monkeypatch):
    monkeypatch.setattr(console, "PLAIN_EVERY_S", 0.0)
    console.set_quiet(True)
    try:
        with console.track("learn dog", 2) as update:
            update(2)
        console.say("hello")
    finally:
        console.set_quiet(False)
    assert capsys.readouterr().err == ""
