import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fl2t.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `fl2t ARGS` in this process, as the console script does."""
    old = sys.argv
    sys.argv = ["fl2t", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_learn_generate_export_from_the_command_line(tmp_path, tiny_base, concepts_root):
    """The real console script, in a subprocess, as a user runs it."""
    lib = tmp_path / "lib"
    env = dict(os.environ)
    fl2t = [sys.executable, "-m", "fl2t.cli"]
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("learn:\n  steps: 3\n  num_anchors: 1\n  anchor_steps: 2\n  rank: 2\nconsolidate:\n  steps: 2\n")
    r = subprocess.run(
        [
            *fl2t,
            "-q",
            "learn",
            concepts_root / "c-checkbox",
            "--library",
            lib,
            "--base",
            tiny_base,
            "--config",
            cfg,
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "learned c-checkbox" in r.stdout
    record = json.loads((lib / "experts" / "c-checkbox" / "expert.json").read_text())
    assert (record["rank"], record["settings"]["steps"], record["settings"]["seed"]) == (2, 3, 1)

    r = subprocess.run(
        [
            *fl2t,
            "-q",
            "generate",
            "a photo of <c-checkbox> box",
            "--library",
            lib,
            "--concept",
            "c-checkbox",
            "-o",
            tmp_path / "img.png",
            "--steps",
            "3",
            "--num-images",
            "2",
            "--size",
            "32",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert [Image.open(tmp_path / f"img-{i}.png").size for i in range(2)] == [(32, 32), (32, 32)]

    r = subprocess.run(
        [*fl2t, "export", "--library", lib, "--concept", "c-checkbox", "-o", tmp_path / "exp"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "exp" / "pytorch_lora_weights.safetensors").is_file()

    r = subprocess.run([*fl2t, "library", "show", lib, "--json"], capture_output=True, text=True, env=env)
    assert json.loads(r.stdout)["experts"]["c-checkbox"]["tokens"] == ["<c-checkbox>"]


def test_generate_is_reproducible_for_a_seed(tmp_path, learned_library, capsys):
    args = [
        "generate",
        "a photo of <c-stripeball> ball",
        "-l",
        learned_library,
        "--concept",
        "c-stripeball",
        "--steps",
        "3",
        "--seed",
        "7",
    ]
    assert run([*args, "-o", tmp_path / "a.png"], capsys)[0] == 0
    assert run([*args, "-o", tmp_path / "b.png"], capsys)[0] == 0
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["learn", "{concepts}/nope", "-l", "{lib}", "--base", "{base}"], "no such concept folder"),
        (
            ["learn", "{concepts}/c-checkbox", "-l", "{lib}", "--base", "/no/such/model"],
            "--base /no/such/model: no such folder",
        ),
        (
            ["learn", "{concepts}/c-checkbox", "-l", "{lib}", "--base", "{base}", "--config", "{bad_cfg}"],
            "learn.stepz: unknown setting",
        ),
        (["learn", "{concepts}/c-stripeball", "-l", "{lib}"], "a concept named 'c-stripeball' exists; pass --replace"),
        (
            ["learn", "{concepts}/c-checkbox", "-l", "{lib}", "--token", "<c-stripeball>"],
            "token '<c-stripeball>' belongs to concept 'c-stripeball'",
        ),
        (
            ["learn", "{concepts}/c-checkbox", "-l", "{lib}", "--steps", "0"],
            "learn.steps: Input should be greater than or equal to 1",
        ),
        (["learn", "{concepts}/c-checkbox", "-l", "{file}", "--base", "{base}"], "is a file, not a folder"),
        (["generate", "x", "-l", "{lib}", "--concept", "dog"], "no concept named 'dog'"),
        (["generate", "x", "-l", "{lib}", "-o", "{lib}/x.txt"], "give an image file name"),
        (["export", "-l", "{lib}", "--concept", "c-stripeball", "-o", "{lib}"], "exists and is not empty"),
        (["library", "show", "{concepts}"], "not an fl2t library"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_leave_the_library_alone(
    args, message, tmp_path, library_copy, tiny_base, concepts_root, capsys
):
    (tmp_path / "bad.yaml").write_text("learn:\n  stepz: 3\n")
    (tmp_path / "afile").write_text("x")
    fill = dict(
        concepts=concepts_root, lib=library_copy, base=tiny_base, bad_cfg=tmp_path / "bad.yaml", file=tmp_path / "afile"
    )
    before = _snapshot(library_copy)
    code, out, err = run([a.format(**fill) for a in args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fl2t: error: ") and message in err, err
    assert _snapshot(library_copy) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lern"], "Did you mean 'learn'?"),
        (["learn", "x", "--library", "y", "--quiet"], "No such option: --quiet"),
        (["generate", "p", "--library", "y", "--steps", "many"], "Invalid value for '--steps'"),
    ],
)
def test_a_usage_error_prints_the_usage_and_exits_2(args, message, capsys):
    code, out, err = run(args, capsys)
    assert code == 2
    assert message in err and "Usage: fl2t" in err and "internal error" not in err


def test_help_names_option_types_in_words(capsys):
    code, out, _ = run(["learn", "--help"], capsys)
    assert code == 0
    assert "--steps N" in out and "--library FOLDER" in out and "--lr RATE" in out
    assert "<bool>" not in out and "<int>" not in out
