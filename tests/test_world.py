"""The tiny world: generator, concepts, shipped weights. Builds nothing; loads the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fl2t.data import load_concept
from fl2t.errors import Fl2tError
from fl2t.models import TOKENIZER_DIR
from fl2t.models import clip_tokenizer as tokenizer
from fl2t.world import CONCEPTS, PROMPT_TEMPLATES, base_path, evaluator_path, write_concepts
from fl2t.world.concepts import concept_appearances
from fl2t.world.generator import (
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    SIZE,
    Scene,
    caption,
    held_out_combos,
    is_held_out,
    random_scene,
    render,
)
from fl2t.worldkit.build import verify_manifest


def _scenes(seed: int, n: int, **kw) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, **kw) for _ in range(n)]


def test_generator_same_seed_gives_same_scenes_pixels_and_captions():
    a, b = _scenes(3, 20, rich=True, held_out=None), _scenes(3, 20, rich=True, held_out=None)
    assert a == b
    assert [caption(s) for s in a] == [caption(s) for s in b]
    for s, t in zip(a, b):
        assert np.array_equal(np.asarray(render(s)), np.asarray(render(t)))
    assert a != _scenes(4, 20, rich=True, held_out=None)


def test_rendered_picture_shows_the_captioned_colour_and_background():
    for s in _scenes(0, 60):
        img = np.asarray(render(s)).astype(int)
        assert img.shape == (SIZE, SIZE, 3)
        words = caption(s)
        assert f"a {s.size} {s.colour} {s.shape} on a {s.background} background, {s.position}" == words
        # The most common colour that is not the background is the object's colour.
        flat = img.reshape(-1, 3)
        bg_dist = np.abs(flat - np.array(BACKGROUNDS[s.background])).max(axis=1)
        assert (bg_dist <= 12).mean() > 0.5, "the background should fill most of the picture"
        obj = flat[np.abs(flat - np.array(COLOURS[s.colour])).max(axis=1) <= 12]
        assert len(obj) >= 40, f"{words}: too few pixels of the object's colour"


def test_position_words_put_the_object_in_that_corner():
    s = Scene("circle", "red", "black", "top left", "small", jitter=1)
    img = np.asarray(render(s)).astype(int)
    red = np.abs(img - np.array(COLOURS["red"])).max(axis=2) <= 12
    ys, xs = np.nonzero(red)
    assert xs.mean() < SIZE / 2 and ys.mean() < SIZE / 2


def test_held_out_combinations_never_appear_in_pretraining_and_number_at_least_100():
    assert len(held_out_combos()) >= 100
    assert not any(is_held_out(s.combo) for s in _scenes(1, 300, held_out=False))
    assert all(is_held_out(s.combo) for s in _scenes(1, 50, held_out=True))


def test_pretraining_pictures_never_show_a_concept_look():
    looks = concept_appearances()
    scenes = _scenes(2, 3000, rich=True, held_out=None, exclude=looks)
    assert not any((s.shape, s.pattern, s.colour, s.colour2) in looks for s in scenes)
    assert any(s.pattern for s in scenes) and any(s.style for s in scenes)


def test_base_model_pretraining_has_patterns_but_no_concept_look_style_or_held_out_combination():
    from fl2t.worldkit.build import pretraining_scenes

    scenes = pretraining_scenes(0, 3000)
    looks = concept_appearances()
    assert not any((s.shape, s.pattern, s.colour, s.colour2) in looks for s in scenes)
    assert not any(s.style for s in scenes) and not any(is_held_out(s.combo) for s in scenes)
    assert 0.2 < np.mean([s.pattern is not None for s in scenes]) < 0.5
    assert {s.pattern for s in scenes if s.pattern} == set(PATTERNS)


def test_concepts_are_ten_with_seven_objects_and_three_styles_and_new_tokens():
    assert len(CONCEPTS) >= 10
    assert sum(c.kind == "object" for c in CONCEPTS) >= 7
    assert sum(c.kind == "style" for c in CONCEPTS) >= 3
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    tok = tokenizer()
    for c in CONCEPTS:
        assert c.token + "</w>" not in vocab and c.token not in vocab
        assert len(tok(c.token, add_special_tokens=False).input_ids) > 1
    assert len({c.token for c in CONCEPTS}) == len(CONCEPTS)


def test_prompt_templates_are_twenty_per_kind_with_one_slot():
    assert set(PROMPT_TEMPLATES) == {"object", "style"}
    for templates in PROMPT_TEMPLATES.values():
        assert len(templates) == 20 and len(set(templates)) == 20
        assert all(t.count("{}") == 1 for t in templates)


def test_written_concept_folders_are_valid_user_concepts(tmp_path: Path):
    folders = write_concepts(tmp_path)
    assert [f.name for f in folders] == [c.name for c in CONCEPTS]
    for c, folder in zip(CONCEPTS, folders):
        spec = yaml.safe_load((folder / "concept.yaml").read_text())
        assert spec == {"name": c.name, "tokens": [c.token], "class_word": c.class_word, "kind": c.kind}
        pngs = sorted(folder.glob("*.png"))
        assert 4 <= len(pngs) <= 7
        for png in pngs:
            assert Image.open(png).size == (SIZE, SIZE)
            assert c.token in png.with_suffix(".txt").read_text()
    # Writing again gives the same bytes.
    again = write_concepts(tmp_path / "again")
    for a, b in zip(folders, again):
        assert (a / "00.png").read_bytes() == (b / "00.png").read_bytes()


def test_written_concepts_load_with_the_data_loader(tmp_path: Path):
    for folder in write_concepts(tmp_path):
        concept = load_concept(folder)
        assert len(concept.images) == 5 and all(concept.captions)


def test_write_concepts_into_a_file_is_a_user_error(tmp_path: Path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(Fl2tError, match="directory"):
        write_concepts(f)


def test_shipped_weights_match_manifest_and_are_safetensors_under_20_mb():
    root = base_path().parent
    assert verify_manifest(root) == []
    files = json.loads((root / "manifest.json").read_text())["files"]
    assert any(f.endswith(".safetensors") for f in files)
    for rel in files:
        assert Path(rel).suffix not in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
        assert (root / rel).stat().st_size < 20 * 2**20


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(base_path())
    p.set_progress_bar_config(disable=True)
    return p


def test_shipped_base_pipeline_generates_a_32px_image_deterministically(pipe):
    torch.set_num_threads(2)

    def one():
        g = torch.Generator().manual_seed(0)
        return pipe("a red star on a black background", num_inference_steps=3, generator=g, output_type="np").images

    a, b = one(), one()
    assert a.shape == (1, SIZE, SIZE, 3)
    assert np.array_equal(a, b)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.tokenize("a red star") == tokenizer().tokenize("a red star")  # the real CLIP BPE


def test_shipped_evaluator_loads_like_clip_and_reads_a_picture():
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(evaluator_path()).eval()
    proc = CLIPProcessor.from_pretrained(evaluator_path())
    img = render(Scene("star", "red", "white", "in the center", "large", jitter=5))
    texts = [
        "a red star on a white background",
        "a blue ring on a black background",
        "a green square on a gray background",
    ]
    inputs = proc(text=texts, images=[img], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (1, 3)
    assert logits.argmax().item() == 0


def test_world_cli_path_prints_the_base_folder():
    from typer.testing import CliRunner

    from fl2t.worldkit.cli import app

    result = CliRunner().invoke(app, ["path"])
    assert result.exit_code == 0
    assert result.output.strip() == str(base_path())
