"""Bad input, run through the command line as a user would (issue 7, item 1).

Every refused case exits 2 with exactly one line on stderr, `fl2t: error: ...`, saying what is wrong and what
to do; no traceback; and the library byte-identical to before. The bad files are made here, in tmp_path.
Odd but valid images (huge, 16-bit, CMYK, palette, grayscale+alpha, EXIF-rotated) must load, converted right.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl2t.data import load_concept
from fl2t.models import tiny_random_pipeline
from test_cli import _snapshot, run


# -- helpers ----------------------------------------------------------------------------------------------
def _state(path: Path):
    """Everything at `path`: the bytes of each file of a folder, of a file, or None when nothing is there."""
    if path.is_dir():
        return _snapshot(path)
    return path.read_bytes() if path.exists() else None


def refused(args: list, message: str, library: Path, capsys) -> str:
    """Run `fl2t ARGS`; check exit 2, one clear stderr line containing `message`, and `library` unchanged."""
    before = _state(library)
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert err.startswith("fl2t: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert message in err, err
    assert _state(library) == before
    return err


def _images(folder: Path, n: int = 3, size=(32, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 120, 200)).save(folder / f"{i:02d}.png")
    return folder


def _concept(folder: Path, n: int = 3, **spec) -> Path:
    """A valid concept folder named after `folder` (new to the library), with a concept.yaml."""
    _images(folder, n)
    name = spec.pop("name", folder.name)
    spec = {"name": name, "tokens": [f"<{name}>"], "class_word": "ball", **spec}
    (folder / "concept.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return folder


def _png(width: int, height: int, rows: bytes, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG file written by hand: its header can claim any size without the pixels being allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _truncated(path: Path, fmt: str) -> None:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def learn(tmp_path, library_copy, tiny_base):
    """`fl2t learn FOLDER -l LIB --base BASE` for a new concept folder, made by `_concept` then broken by a case."""
    folder = _concept(tmp_path / "c-new")
    return folder, ["learn", folder, "-l", library_copy, "--base", tiny_base]


# -- images ----------------------------------------------------------------------------------------------
def _zero_bytes(d):
    (d / "01.png").write_bytes(b"")


def _truncated_jpeg(d):
    _truncated(d / "03.jpg", "JPEG")


def _truncated_png(d):
    _truncated(d / "01.png", "PNG")


def _text_named_jpg(d):
    (d / "03.jpg").write_text("this is not a picture\n")


def _decompression_bomb(d):
    # The header claims 40000x40000 (1.6 gigapixels); Pillow refuses it at open, nothing is allocated.
    (d / "03.png").write_bytes(_png(40000, 40000, b"\x00" * 64, bit_depth=1))


def _tiny_image(d):
    Image.new("RGB", (4, 4)).save(d / "01.png")


@pytest.mark.parametrize(
    "breaks, message",
    [
        (_zero_bytes, "01.png: file is empty (0 bytes); replace or remove it"),
        (_truncated_jpeg, "03.jpg: not a readable image, damaged or incomplete"),
        (_truncated_png, "01.png: not a readable image, damaged or incomplete"),
        (_text_named_jpg, "03.jpg: not a readable image (not a jpg, png or webp file); replace or remove"),
        (_decompression_bomb, "03.png: image is too large to decode safely (1600 megapixels"),
        (_tiny_image, "01.png: image is 4x4 pixels, too small to learn from"),
    ],
    ids=["zero-bytes", "truncated-jpeg", "truncated-png", "text-named-jpg", "decompression-bomb", "tiny-image"],
)
def test_a_bad_image_is_refused_before_training(breaks, message, learn, library_copy, capsys):
    folder, args = learn
    breaks(folder)
    refused(args, message, library_copy, capsys)


# -- concept folders and concept.yaml ----------------------------------------------------------------------
def _empty_folder(d):
    shutil.rmtree(d)
    d.mkdir()


def _one_image(d):
    for p in ["01.png", "02.png"]:
        (d / p).unlink()


def _caption_without_token_or_class(d):
    (d / "00.txt").write_text("a photo of something on a table\n")


def _caption_not_utf8(d):
    (d / "00.txt").write_bytes("a photo of a ball in a café".encode("latin-1"))


def _yaml(text):
    def write(d):
        (d / "concept.yaml").write_text(text)

    return write


@pytest.mark.parametrize(
    "breaks, message",
    [
        (_empty_folder, "found no images (jpg, png, webp); a concept needs at least 3 reference images"),
        (_one_image, "found 1 image (jpg, png, webp); a concept needs at least 3"),
        (
            _caption_without_token_or_class,
            "names neither the concept token '<c-new>' nor its class word 'ball'; write e.g.",
        ),
        (_caption_not_utf8, "00.txt: not UTF-8 text; save it as UTF-8"),
        (
            _yaml("name: c-new\ncolour: red\n"),
            "colour: unknown key in concept.yaml; the keys are name, tokens, class_word, kind",
        ),
        (
            _yaml("name: c-new\ntokens: 5\n"),
            "tokens: Input should be a valid list (got 5); write e.g. tokens: ['<my-dog>']",
        ),
        (_yaml("name: c-new\nkind: animal\n"), "kind: Input should be 'object' or 'style' (got 'animal')"),
        (_yaml("name: c-new\nclass_word: [ball, toy]\n"), "class_word: Input should be a valid string"),
        (_yaml("name: a/b\n"), "concept name 'a/b' is not allowed: use 1-64 letters"),
        (_yaml("name: ..\n"), "concept name '..' is not allowed"),
        (_yaml('name: "c-new\\a"\n'), r"concept name 'c-new\x07' is not allowed"),
        (_yaml('name: "c-new\\n"\n'), r"concept name 'c-new\n' is not allowed"),
        (_yaml("name: c-new\ntokens: ['<c new>']\n"), "token '<c new>' is not allowed: one word without spaces"),
        (_yaml("name: [c-new\n"), "concept.yaml: not valid YAML at line 2"),
        (_yaml("- c-new\n- ball\n"), "concept.yaml: expected a mapping with keys name, tokens, class_word, kind"),
    ],
    ids=[
        "empty-folder",
        "one-image",
        "caption-without-token",
        "caption-not-utf8",
        "yaml-unknown-key",
        "yaml-tokens-int",
        "yaml-kind-animal",
        "yaml-class-word-list",
        "name-slash",
        "name-dotdot",
        "name-bell",
        "name-newline",
        "token-with-space",
        "yaml-syntax",
        "yaml-not-mapping",
    ],
)
def test_a_bad_concept_folder_is_refused_before_training(breaks, message, learn, library_copy, capsys):
    folder, args = learn
    breaks(folder)
    refused(args, message, library_copy, capsys)


def test_a_concept_name_with_dots_and_slash_from_the_flag_is_refused(learn, library_copy, capsys):
    _, args = learn
    refused([*args, "--name", "../evil"], "concept name '../evil' is not allowed", library_copy, capsys)
    assert not (library_copy.parent / "evil").exists()


def test_a_token_that_is_a_tokenizer_word_is_refused(learn, library_copy, capsys):
    _, args = learn
    refused(
        [*args, "--token", "dog"],
        "token 'dog' is already a word of the tokenizer; choose a new token",
        library_copy,
        capsys,
    )


def test_a_token_of_a_concept_in_the_library_is_refused(tmp_path, library_copy, tiny_base, capsys):
    folder = _concept(tmp_path / "c-other", tokens=["<c-stripeball>"])
    args = ["learn", folder, "-l", library_copy, "--base", tiny_base]
    refused(args, "token '<c-stripeball>' belongs to concept 'c-stripeball'; choose other tokens", library_copy, capsys)


def test_two_folders_sharing_a_token_are_refused(tmp_path, library_copy, tiny_base, capsys):
    a = _concept(tmp_path / "c-one", tokens=["<c-same>"])
    b = _concept(tmp_path / "c-two", tokens=["<c-same>"])
    args = ["learn", a, b, "-l", library_copy, "--base", tiny_base]
    refused(args, "name or token '<c-same>' is also used by", library_copy, capsys)


# -- settings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("learn:\n  num_anchor: 0\n", "learn.num_anchor: unknown setting"),
        ("learn:\n  steps: many\n", "learn.steps: Input should be a valid integer"),
        ("learn:\n  mixed_precision: fp8\n", "learn.mixed_precision: Input should be 'no', 'fp16' or 'bf16'"),
        ("learn: 5\n", "section 'learn' must be a mapping"),
    ],
    ids=["unknown-setting", "steps-not-int", "precision-unknown", "section-not-mapping"],
)
def test_a_bad_settings_file_is_refused(yaml_text, message, tmp_path, learn, library_copy, capsys):
    _, args = learn
    (tmp_path / "settings.yaml").write_text(yaml_text)
    refused([*args, "--config", tmp_path / "settings.yaml"], message, library_copy, capsys)


# -- base models -----------------------------------------------------------------------------------------
def test_a_base_that_does_not_exist_is_refused(tmp_path, learn, library_copy, capsys):
    folder, args = learn
    args = ["learn", folder, "-l", library_copy]
    refused(
        [*args, "--base", tmp_path / "no-such-model"],
        "no-such-model: no such folder, and not a hub id",
        library_copy,
        capsys,
    )
    refused(
        [*args, "--base", tmp_path], "not a diffusers pipeline folder (no model_index.json in it)", library_copy, capsys
    )


def test_a_base_with_only_pickled_weights_is_refused(tmp_path, learn, library_copy, capsys):
    pickled = tmp_path / "pickled-sd"
    tiny_random_pipeline(seed=0).save_pretrained(pickled, safe_serialization=False)
    assert list(pickled.glob("unet/*.bin"))
    folder, _ = learn
    args = ["learn", folder, "-l", library_copy, "--base", pickled]
    refused(
        args,
        "unet/diffusion_pytorch_model.bin holds pickled weights, and fl2t loads only safetensors",
        library_copy,
        capsys,
    )
    unet_bin = next(pickled.glob("unet/*.bin"))
    refused(["learn", folder, "-l", library_copy, "--base", unet_bin], "is a pickled checkpoint", library_copy, capsys)


def test_a_library_learned_on_another_base_refuses_it(tmp_path, learn, library_copy, tiny_base, capsys):
    other = tmp_path / "other-sd"
    shutil.copytree(tiny_base, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    config["attention_head_dim"] = 4  # same weight shapes, another architecture
    (other / "unet" / "config.json").write_text(json.dumps(config))
    folder, _ = learn
    refused(["learn", folder, "-l", library_copy, "--base", other], "has another architecture", library_copy, capsys)


# -- libraries -------------------------------------------------------------------------------------------
def test_a_library_path_that_is_a_file_is_refused(tmp_path, learn, capsys):
    folder, args = learn
    lib = tmp_path / "notes.txt"
    lib.write_text("my notes\n")
    args[args.index("-l") + 1] = lib
    refused(args, "is a file, not a folder; choose another --library path", lib, capsys)


def test_a_new_library_is_not_created_when_learning_is_refused(tmp_path, learn, capsys):
    folder, args = learn
    (folder / "01.png").write_bytes(b"")
    lib = tmp_path / "new-lib"
    args[args.index("-l") + 1] = lib
    refused(args, "file is empty", lib, capsys)
    assert not lib.exists()


def _generate(lib: Path, tmp_path: Path, concept: str = "c-stripeball") -> list:
    return [
        "generate",
        "a photo of <c-stripeball> ball",
        "-l",
        lib,
        "--concept",
        concept,
        "-o",
        tmp_path / "out.png",
        "--steps",
        "1",
        "--size",
        "32",
    ]


def _export(lib: Path, tmp_path: Path) -> list:
    return ["export", "-l", lib, "--concept", "c-stripeball", "-o", tmp_path / "export"]


def _set_manifest_hash(lib: Path, value: str) -> None:
    manifest = json.loads((lib / "library.json").read_text())
    manifest["experts"]["c-stripeball"] = value
    (lib / "library.json").write_text(json.dumps(manifest, indent=2))


def test_a_manifest_with_a_wrong_hash_is_refused(tmp_path, library_copy, capsys):
    _set_manifest_hash(library_copy, "0" * 64)
    refused(
        _generate(library_copy, tmp_path),
        "expert 'c-stripeball' does not match the manifest's hash",
        library_copy,
        capsys,
    )
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("command", [_generate, _export], ids=["generate", "export"])
def test_a_half_written_expert_is_refused(command, tmp_path, library_copy, capsys):
    (library_copy / "experts" / "c-stripeball" / "lora.safetensors").unlink()
    refused(
        command(library_copy, tmp_path),
        "lora.safetensors: missing; the expert is incomplete; relearn it",
        library_copy,
        capsys,
    )
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "export").exists()


def test_an_expert_without_its_record_is_refused(tmp_path, library_copy, capsys):
    (library_copy / "experts" / "c-stripeball" / "expert.json").unlink()
    refused(_generate(library_copy, tmp_path), "expert 'c-stripeball' is missing or half-written", library_copy, capsys)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickled_weights_in_a_library_are_refused(suffix, tmp_path, library_copy, capsys):
    torch.save({"lora": torch.zeros(2, 2)}, library_copy / "experts" / "c-stripeball" / f"lora{suffix}")
    refused(_generate(library_copy, tmp_path), "pickled weights are never loaded", library_copy, capsys)
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    "command", [_generate, _export, lambda lib, _: ["library", "show", lib]], ids=["generate", "export", "show"]
)
def test_a_corrupt_manifest_is_refused(command, tmp_path, library_copy, capsys):
    (library_copy / "library.json").write_text('{"format": 1, "experts": {')
    refused(command(library_copy, tmp_path), "library.json: not valid JSON", library_copy, capsys)


def test_learning_into_a_library_with_a_corrupt_manifest_is_refused(learn, library_copy, capsys):
    (library_copy / "library.json").write_bytes(b"\x00\xff not json")
    _, args = learn
    refused(args, "library.json: not valid JSON", library_copy, capsys)


def test_export_into_a_non_empty_folder_is_refused(tmp_path, library_copy, capsys):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("mine\n")
    refused(_export(library_copy, tmp_path), "exists and is not empty; choose a new -o folder", library_copy, capsys)
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["keep.txt"]


def test_generate_with_a_concept_not_in_the_library_is_refused(tmp_path, library_copy, capsys):
    args = _generate(library_copy, tmp_path, concept="c-nope")
    refused(args, "no concept named 'c-nope' (it has: c-stripeball)", library_copy, capsys)


def test_generate_from_a_missing_library_is_refused(tmp_path, capsys):
    refused(_generate(tmp_path / "no-lib", tmp_path), "no such library", tmp_path / "no-lib", capsys)


# -- odd but valid images --------------------------------------------------------------------------------
def test_a_10000_pixel_image_is_downscaled_not_refused(tmp_path):
    d = tmp_path / "c-huge"
    d.mkdir()
    Image.new("L", (10000, 10000), 200).save(d / "00.jpg")  # 100 megapixels: over Pillow's warning, under its limit
    rows = (b"\x00" + b"\xff" * 1250) * 10000  # 1-bit white PNG, decoded without the JPEG draft shortcut
    (d / "01.png").write_bytes(_png(10000, 10000, rows, bit_depth=1))
    c = load_concept(d, min_images=2)
    assert [im.size for im in c.images] == [(2048, 2048), (2048, 2048)]
    assert np.asarray(c.images[0])[1000, 1000].tolist() == [200, 200, 200]
    assert np.asarray(c.images[1])[1000, 1000].tolist() == [255, 255, 255]


def _odd_images(d: Path) -> Path:
    d.mkdir()
    a = np.zeros((32, 32), dtype=np.uint16)
    a[:, 16:] = 32896  # 16-bit gray: the right half is 128 in 8 bits
    Image.fromarray(a).save(d / "a-gray16.png")
    rgb16 = b"".join(b"\x00" + struct.pack(">HHH", 65535, 0, 32896) * 32 for _ in range(32))
    (d / "b-rgb16.png").write_bytes(_png(32, 32, rgb16, bit_depth=16, colour_type=2))
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(d / "c-cmyk.jpg", quality=95)
    p = Image.new("P", (32, 32), 1)
    p.putpalette([0, 0, 0, 0, 200, 0])
    p.paste(0, (0, 0, 8, 8))
    p.save(d / "d-palette.png", transparency=0)  # index 0 transparent: the top-left corner becomes white
    la = Image.new("LA", (32, 32), (0, 255))
    la.paste((0, 0), (16, 0, 32, 32))  # right half fully transparent
    la.save(d / "e-gray-alpha.png")
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = im.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 20 wide, 40 high, red on top
    im.save(d / "f-rotated.jpg", exif=exif, quality=95)
    return d


def test_odd_image_modes_are_converted_to_upright_rgb(tmp_path):
    c = load_concept(_odd_images(tmp_path / "c-odd"))
    gray16, rgb16, cmyk, palette, gray_alpha, rotated = (np.asarray(im).astype(int) for im in c.images)
    assert all(im.mode == "RGB" for im in c.images)
    assert gray16[5, 5].tolist() == [0, 0, 0] and gray16[5, 25].tolist() == [128, 128, 128]
    assert rgb16[5, 5].tolist() == [255, 0, 128]
    assert cmyk[16, 16, 0] > 240 and cmyk[16, 16, 1:].max() < 20
    assert palette[2, 2].tolist() == [255, 255, 255] and palette[20, 20].tolist() == [0, 200, 0]
    assert gray_alpha[5, 5].tolist() == [0, 0, 0] and gray_alpha[5, 25].tolist() == [255, 255, 255]
    assert rotated.shape == (40, 20, 3)
    assert rotated[5, 10, 0] > 240 and rotated[5, 10, 2] < 20  # red on top
    assert rotated[35, 10, 2] > 240 and rotated[35, 10, 0] < 20  # blue below


def test_hidden_files_in_a_concept_folder_are_not_images(tmp_path):
    d = _images(tmp_path / "c-mac")
    (d / "._00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS resource fork
    assert len(load_concept(d).images) == 3


def test_a_concept_of_odd_images_learns_from_the_command_line(tmp_path, tiny_base, capsys):
    d = _odd_images(tmp_path / "c-odd")
    (tmp_path / "settings.yaml").write_text("learn:\n  steps: 1\n  num_anchors: 0\n")
    code, out, err = run(
        [
            "-q",
            "learn",
            d,
            "-l",
            tmp_path / "lib",
            "--base",
            tiny_base,
            "--config",
            tmp_path / "settings.yaml",
            "--no-consolidate",
        ],
        capsys,
    )
    assert code == 0, err
    assert "learned c-odd" in out and (tmp_path / "lib" / "experts" / "c-odd" / "lora.safetensors").is_file()
