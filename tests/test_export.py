import json
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from fl2t.cli import main
from fl2t.errors import Fl2tError
from fl2t.export import export_expert
from fl2t.library import Library
from fl2t.pipeline import ExpertPipeline

PROMPT = "a photo of <c-stripeball> ball"
SAMPLE = dict(num_inference_steps=4, output_type="np")


def _images(pipe, prompt):
    return pipe(prompt, generator=torch.Generator().manual_seed(3), **SAMPLE).images


@pytest.fixture(scope="module")
def ours(learned_library):
    return _images(ExpertPipeline.from_library(learned_library, "c-stripeball"), PROMPT)


def _plain(tiny_base):
    return StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)


def test_exported_files_load_in_plain_diffusers_and_match(tmp_path, learned_library, tiny_base, ours):
    expert = Library(learned_library).expert("c-stripeball")
    out = export_expert(expert, tmp_path / "export")

    plain = _plain(tiny_base)
    plain.load_lora_weights(out)
    plain.load_textual_inversion(str(out / "textual_inversion" / "00-c-stripeball.safetensors"), token="<c-stripeball>")

    a = _images(plain, PROMPT)
    assert abs(a - ours).max() < 1e-5
    # and the LoRA really is in play: without it plain diffusers draws something else
    plain.unload_lora_weights()
    c = _images(plain, PROMPT)
    assert abs(a - c).max() > 1e-3


def test_kohya_export_converts_back_with_diffusers_loader_and_matches(tmp_path, learned_library, tiny_base, ours):
    expert = Library(learned_library).expert("c-stripeball")
    out = export_expert(expert, tmp_path / "kohya", format="kohya")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md",
        "c-stripeball.safetensors",
        "concept.json",
        "embeddings/c-stripeball.safetensors",
    ]
    with safe_open(out / "c-stripeball.safetensors", "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    # kohya's layout, as AUTOMATIC1111 and ComfyUI read it: one down/up/alpha triple per adapted module
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert len(keys) == 3 * len(expert.modules)
    assert float(alpha) == expert.rank and meta["ss_network_dim"] == str(expert.rank)
    assert json.loads((out / "concept.json").read_text())["trigger_word"] == "c-stripeball"

    # diffusers' own kohya converter takes the file back; its trigger word is the embedding's file name
    plain = _plain(tiny_base)
    plain.load_lora_weights(out, weight_name="c-stripeball.safetensors")
    plain.load_textual_inversion(str(out / "embeddings" / "c-stripeball.safetensors"), token="c-stripeball")
    a = _images(plain, "a photo of c-stripeball ball")
    assert abs(a - ours).max() < 1e-5
    plain.unload_lora_weights()
    assert abs(_images(plain, "a photo of c-stripeball ball") - a).max() > 1e-3


def test_export_refuses_an_unknown_format_and_a_used_folder(tmp_path, learned_library):
    expert = Library(learned_library).expert("c-stripeball")
    with pytest.raises(Fl2tError, match="diffusers, kohya"):
        export_expert(expert, tmp_path / "x", format="ckpt")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "a.txt").write_text("x")
    with pytest.raises(Fl2tError, match="not empty"):
        export_expert(expert, tmp_path / "used", format="kohya")
    assert not (tmp_path / "x").exists()


def _fl2t(args: list, capsys) -> tuple[int, str, str]:
    """`fl2t ARGS` in this process, as the console script runs it."""
    old = sys.argv
    sys.argv = ["fl2t", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_export_command_writes_either_format_and_refuses_others(tmp_path, learned_library, capsys):
    code, out, err = _fl2t(
        [
            "export",
            "-l",
            learned_library,
            "--concept",
            "c-stripeball",
            "-o",
            tmp_path / "k",
            "--format",
            "kohya",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(json.loads(out)["files"]) == [
        "README.md",
        "c-stripeball.safetensors",
        "concept.json",
        "embeddings/c-stripeball.safetensors",
    ]
    code, out, err = _fl2t(["export", "-l", learned_library, "--concept", "c-stripeball", "-o", tmp_path / "d"], capsys)
    assert code == 0 and (tmp_path / "d" / "pytorch_lora_weights.safetensors").is_file()
    code, out, err = _fl2t(
        ["export", "-l", learned_library, "--concept", "c-stripeball", "-o", tmp_path / "x", "--format", "ckpt"], capsys
    )
    assert code == 2 and "use one of: diffusers, kohya" in err and not (tmp_path / "x").exists()
