from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fl2t.data import load_concept, load_image
from fl2t.errors import Fl2tError


def _images(folder: Path, n: int, size=(40, 32), suffix=".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:02d}{suffix}"
        Image.new("RGB", size, (10 * i, 100, 200)).save(p)
        paths.append(p)
    return paths


def test_plain_folder_reads_yaml_and_captions(tmp_path):
    d = tmp_path / "whatever"
    _images(d, 3)
    (d / "00.txt").write_text("a <c-dog> dog on a beach\nsecond line ignored")
    (d / "01.txt").write_text("a dog sitting on a ledge")
    (d / "concept.yaml").write_text(
        yaml.safe_dump({"name": "mydog", "tokens": ["<c-dog>"], "class_word": "dog", "kind": "object"})
    )
    c = load_concept(d)
    assert (c.name, c.spec.tokens, c.spec.class_word, c.spec.kind) == ("mydog", ["<c-dog>"], "dog", "object")
    assert c.captions == ["a <c-dog> dog on a beach", "a <c-dog> dog sitting on a ledge", None]
    assert [im.size for im in c.images] == [(40, 32)] * 3 and all(im.mode == "RGB" for im in c.images)
    assert c.spec.stable_prompt == "a photo of <c-dog> dog"


def test_folder_name_gives_name_token_and_class_word(tmp_path):
    _images(tmp_path / "dog2", 3)
    c = load_concept(tmp_path / "dog2")
    assert (c.name, c.spec.tokens, c.spec.class_word) == ("dog2", ["<dog2>"], "dog")


def test_cifc_layout_maps_class_phrase_to_tokens(tmp_path):
    img = tmp_path / "cifc" / "images" / "duck_toy"
    cap = tmp_path / "cifc" / "caption" / "duck_toy"
    _images(img, 4, suffix=".jpg")
    cap.mkdir(parents=True)
    for i in range(4):
        (cap / f"{i:02d}.txt").write_text(f"duck toy number {i} on a table\n")
    c = load_concept(img)
    assert (c.spec.class_word, c.spec.kind) == ("duck toy", "object")
    assert c.captions[2] == "<duck_toy> duck toy number 2 on a table"
    style = tmp_path / "cifc" / "images" / "ink_painting"
    _images(style, 3)
    (tmp_path / "cifc" / "caption" / "ink_painting").mkdir()
    s = load_concept(style)
    assert (s.spec.kind, s.spec.subject) == ("style", "<ink_painting>")


def test_dreambooth_layout_reads_class_table(tmp_path):
    ds = tmp_path / "dataset"
    _images(ds / "backpack_dog", 5, suffix=".jpg")
    (ds / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\nbackpack,backpack\nbackpack_dog,backpack\nbear_plushie,stuffed animal\n"
    )
    c = load_concept(ds / "backpack_dog")
    assert (c.name, c.spec.class_word, c.captions) == ("backpack_dog", "backpack", [None] * 5)


def test_image_modes_are_converted_to_upright_rgb(tmp_path):
    a = np.zeros((20, 30), dtype=np.uint16)
    a[:, 15:] = 65535
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert np.asarray(load_image(tmp_path / "g16.png"))[0, 20].tolist() == [255, 255, 255]
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg"))[10, 10].tolist()
    assert r > 200 and g < 60 and b < 60
    Image.new("LA", (30, 20), (0, 0)).save(tmp_path / "la.png")  # fully transparent -> white
    assert np.asarray(load_image(tmp_path / "la.png"))[0, 0].tolist() == [255, 255, 255]
    Image.new("P", (30, 20)).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    im = Image.new("RGB", (30, 20), (0, 0, 255))
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 20 wide, 30 high
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 30)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "found no images"),
        ("too_few", "found 2 images"),
        ("corrupt", "not a readable image"),
        ("caption", "names neither the concept token"),
        ("yaml_key", "unknown key"),
        ("bad_name", "name 'a/b' is not allowed"),
        ("missing", "no such concept folder"),
    ],
)
def test_bad_concepts_raise_one_clear_error(tmp_path, case, expected):
    d = tmp_path / "c"
    if case == "empty":
        d.mkdir()
    elif case == "too_few":
        _images(d, 2)
    elif case == "corrupt":
        _images(d, 3)
        (d / "01.png").write_bytes(b"not an image")
    elif case == "caption":
        _images(d, 3)
        (d / "00.txt").write_text("a photo of something else")
    elif case == "yaml_key":
        _images(d, 3)
        (d / "concept.yaml").write_text("name: c\ncolour: red\n")
    elif case == "bad_name":
        _images(d, 3)
        (d / "concept.yaml").write_text("name: a/b\n")
    with pytest.raises(Fl2tError, match=expected):
        load_concept(d)
