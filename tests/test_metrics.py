"""The metric functions against hand-computed values; evaluators loaded from folders saved with save_pretrained."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from fl2t.errors import Fl2tError
from fl2t.metrics import (
    CLASS,
    ClipEvaluator,
    DinoEvaluator,
    average_forgetting,
    class_prompt,
    concept_accuracy,
    image_alignment,
    image_alignments,
    nearest_concepts,
    normalised_image_alignment,
    reference_alignment,
    text_alignment,
    text_alignments,
)

E = torch.eye(3)  # unit vectors e0, e1, e2
DIAG = torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2)  # halfway between e0 and e1


def test_image_alignment_is_the_mean_over_all_pairs():
    # generated: e0 and the diagonal; references: e0 and e1 -> cosines 1, 0, 1/√2, 1/√2
    gen = torch.cat([E[:1], DIAG])
    assert image_alignment(gen, E[:2]) == pytest.approx((1 + 0 + 2 / math.sqrt(2)) / 4)


def test_normalised_ia_divides_by_the_references_own_alignment():
    refs = torch.cat([E[:1], DIAG])  # their mutual cosine is 1/√2
    assert reference_alignment(refs) == pytest.approx(1 / math.sqrt(2))
    gen = E[:1]  # cosines to refs: 1 and 1/√2
    assert normalised_image_alignment(gen, refs) == pytest.approx(((1 + 1 / math.sqrt(2)) / 2) * math.sqrt(2))
    with pytest.raises(Fl2tError):
        reference_alignment(E[:1])


def test_text_alignment_is_clipscore_with_negative_cosines_at_zero():
    images = torch.stack([E[0], E[0], DIAG[0]])
    texts = torch.stack([E[0], -E[0], E[0]])  # cos 1, -1 (-> 0), 1/√2
    assert text_alignment(images, texts) == pytest.approx(2.5 * (1 + 0 + 1 / math.sqrt(2)) / 3)


def test_concept_accuracy_counts_images_nearer_their_own_references():
    refs = {"a": E[:1], "b": E[1:2]}
    class_images = E[2:3]
    gen = torch.stack([E[0], E[1], E[2], torch.tensor([0.8, 0.6, 0.0])])  # own, rival, class, own (0.8 > 0.6)
    assert concept_accuracy(gen, "a", refs, class_images) == pytest.approx(2 / 4)
    assert concept_accuracy(gen, "b", refs, class_images) == pytest.approx(1 / 4)


def test_each_image_is_labelled_with_the_concept_whose_references_are_nearest_or_the_class():
    # a's references: e0 and the diagonal (mean cosine of e0 to them: (1 + 1/√2) / 2 = 0.85); b's: e1
    refs = {"a": torch.cat([E[:1], DIAG]), "b": E[1:2]}
    gen = torch.stack([E[0], E[1], E[2], torch.tensor([0.6, 0.8, 0.0])])
    # the last: to a (0.6 + (0.6 + 0.8)/√2) / 2 = 0.79, to b 0.8: b, by a hair
    assert nearest_concepts(gen, refs, E[2:3]) == ["a", "b", CLASS, "b"]
    assert nearest_concepts(gen, refs, None) == ["a", "b", "a", "b"]  # e2 is at 0 from a and b: the first
    assert concept_accuracy(gen, "b", refs, E[2:3]) == pytest.approx(2 / 4)


def test_the_per_image_scores_average_to_the_metrics():
    gen, refs = torch.cat([E[:1], DIAG, E[2:3]]), E[:2]
    assert image_alignments(gen, refs).tolist() == pytest.approx([0.5, 1 / math.sqrt(2), 0.0])
    assert float(image_alignments(gen, refs).mean()) == pytest.approx(image_alignment(gen, refs))
    texts = torch.stack([E[0], -E[0], E[2]])
    assert text_alignments(gen, texts).tolist() == pytest.approx([2.5, 0.0, 2.5])
    assert float(text_alignments(gen, texts).mean()) == pytest.approx(text_alignment(gen, texts))


def test_average_forgetting_on_a_known_matrix():
    R = [
        [0.9, None, None],
        [0.7, 0.8, None],
        [0.6, 0.8, 0.5],
    ]
    # concept 0: max(0.9, 0.7) - 0.6 = 0.3; concept 1: 0.8 - 0.8 = 0; the last concept does not count
    assert average_forgetting(R) == pytest.approx(0.15)
    assert average_forgetting([[0.5]]) == 0.0


@pytest.mark.parametrize(
    "prompt, tokens, class_word, expected",
    [
        ("a <c-star> star on a black background", ["<c-star>"], "star", "a star on a black background"),
        ("a photo of <d1> <d2> dog", ["<d1>", "<d2>"], "dog", "a photo of dog"),
        (
            "a circle in the style of <s-p>, top left",
            ["<s-p>"],
            "painting",
            "a circle in the style of painting, top left",
        ),
    ],
)
def test_class_prompt_replaces_the_tokens_by_the_class_word(prompt, tokens, class_word, expected):
    assert class_prompt(prompt, tokens, class_word) == expected


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from fl2t.models import clip_tokenizer
    from fl2t.worldkit.models import image_processor

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(cfg).save_pretrained(path, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor(), tokenizer=clip_tokenizer()).save_pretrained(path)
    return path


def test_clip_evaluator_loads_a_saved_clip_and_gives_unit_embeddings(tiny_clip):
    clip = ClipEvaluator.load(tiny_clip)
    images = [Image.new("RGB", (48, 40), c) for c in ("red", "blue")]
    img = clip.image_embeds(images)
    txt = clip.text_embeds(["a red square", "a blue square"])
    assert img.shape == (2, 16) and txt.shape == (2, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(img[0], img[1]) and not torch.allclose(txt[0], txt[1])


@pytest.fixture(scope="module")
def world_clip():
    from fl2t.world import evaluator_path

    return ClipEvaluator.load(evaluator_path())


def test_with_the_world_evaluator_an_image_aligns_with_its_own_caption_and_concept(world_clip):
    """TA of a picture against its own caption beats TA against another picture's; fresh pictures of a concept are
    nearer its references than another concept's (IA) and are labelled as it (CA)."""
    import numpy as np

    from fl2t.world import get_concept
    from fl2t.world.concepts import reference_scenes
    from fl2t.world.generator import Scene, caption, render

    scenes = [
        Scene("circle", "red", "black", "top left", "small"),
        Scene("star", "green", "white", "bottom right", "large"),
        Scene("square", "blue", "gray", "in the center", "small"),
    ]
    images = world_clip.image_embeds([render(s) for s in scenes])
    texts = world_clip.text_embeds([caption(s) for s in scenes])
    for i in range(len(scenes)):
        own = text_alignment(images[i : i + 1], texts[i : i + 1])
        for j in set(range(len(scenes))) - {i}:
            assert own > text_alignment(images[i : i + 1], texts[j : j + 1]) + 1.0, (i, j)
    names = ["stripestar", "checkdiamond", "pastel", "outline"]
    concepts = [get_concept(n) for n in names]
    refs = {c.name: world_clip.image_embeds([render(s) for s in reference_scenes(c)]) for c in concepts}
    rng = np.random.default_rng(5)
    for c in concepts:
        fresh = world_clip.image_embeds([render(c.scene(rng)) for _ in range(4)])
        own = image_alignment(fresh, refs[c.name])
        assert all(own > image_alignment(fresh, refs[o]) + 0.1 for o in names if o != c.name), c.name
        assert concept_accuracy(fresh, c.name, refs, None) >= 0.75, c.name


def test_dino_evaluator_uses_the_cls_feature_of_a_saved_vit(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        add_pooling_layer=False,
    ).save_pretrained(tmp_path / "dino", safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    dino = DinoEvaluator.load(tmp_path / "dino")
    emb = dino.image_embeds([Image.new("RGB", (64, 64), "green"), Image.new("RGB", (64, 64), "white")])
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_an_evaluator_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(Fl2tError, match="safetensors"):
        ClipEvaluator.load(tmp_path)
