"""World v2's pictures (issue 14): generic styles, two-object scenes, the pretraining mix; the v1 pictures unchanged."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from fl2t.world.concepts import CONCEPTS, TUNING_CONCEPTS, concept_appearances, reference_scenes
from fl2t.world.generator import (
    BACKGROUNDS,
    COLOURS,
    GENERIC_STYLES,
    PASTEL_BACKGROUND,
    SHAPES,
    SIZE,
    PairScene,
    Scene,
    caption,
    held_out_pairs,
    is_held_out,
    is_held_out_pair,
    is_held_out_style,
    object_phrase,
    pair_caption,
    pair_centres,
    random_caption,
    random_pair,
    render,
    render_pair,
    styled_scene,
)
from fl2t.worldkit.build import V2_MIX, pretraining_scenes


def test_the_concepts_references_are_pinned():
    """The ten concepts' and the tuning concepts' references and captions, as world v2 draws them (digest taken when
    the styles' captions took four forms, 2026-12-05; f9fd2be71cef4c75 before, v1's 279cfccf08a6d827): the concepts do
    not move under the benchmarks' feet."""
    h = hashlib.sha256()
    for c in CONCEPTS + TUNING_CONCEPTS:
        for i, s in enumerate(reference_scenes(c)):
            h.update(render(s).tobytes())
            h.update(c.caption(s, i).encode())
    assert h.hexdigest()[:16] == "dbd94c799b1e67e4"


def test_pretraining_without_the_v2_shares_is_the_v1_pictures_and_with_them_a_mix():
    v1 = pretraining_scenes(0, 2000)
    assert pretraining_scenes(0, 2000, 0.0, 0.0) == v1
    mixed = pretraining_scenes(0, 2000, V2_MIX["pair_share"], V2_MIX["style_share"])
    kinds = Counter("pair" if isinstance(s, PairScene) else ("style" if s.style else "one") for s in mixed)
    assert abs(kinds["pair"] / 2000 - V2_MIX["pair_share"]) < 0.04
    assert abs(kinds["style"] / 2000 - V2_MIX["style_share"]) < 0.04
    # Single objects that stay are the v1 pictures at the same places.
    same = [a == b for a, b in zip(v1, mixed) if not isinstance(b, PairScene) and not b.style]
    assert all(same) and len(same) == kinds["one"]
    looks = concept_appearances()
    for s in mixed:
        if isinstance(s, PairScene):
            assert not is_held_out_pair(*s.shapes)
            assert all((o.shape, o.pattern, o.colour, o.colour2) not in looks for o in (s.left, s.right))
        elif s.style:
            assert s.style in GENERIC_STYLES and not is_held_out_style(s.style, s.shape)
            assert (s.shape, s.pattern, s.colour, s.colour2) not in looks
        else:
            assert not is_held_out(s.combo)
    assert {s.style for s in mixed if not isinstance(s, PairScene) and s.style} == set(GENERIC_STYLES)
    # More patterned pairs change the pairs alone, at the same places.
    dense = pretraining_scenes(0, 2000, V2_MIX["pair_share"], V2_MIX["style_share"], pair_patterned=0.8)
    assert pretraining_scenes(0, 2000, V2_MIX["pair_share"], V2_MIX["style_share"], pair_patterned=0.3) == mixed
    assert [a for a in dense if not isinstance(a, PairScene)] == [a for a in mixed if not isinstance(a, PairScene)]

    def both(scenes):
        pairs = [p for p in scenes if isinstance(p, PairScene)]
        return sum(bool(p.left.pattern and p.right.pattern) for p in pairs) / len(pairs)

    assert both(mixed) < 0.10 and both(dense) > 0.40


def test_each_generic_style_keeps_its_own_shape_out_of_pretraining_and_every_other_in():
    held = [(st, sh) for st in GENERIC_STYLES for sh in SHAPES if is_held_out_style(st, sh)]
    assert sorted(st for st, _ in held) == sorted(GENERIC_STYLES)
    rng = np.random.default_rng(0)
    seen = {(s.style, s.shape) for s in (styled_scene(rng) for _ in range(1500))}
    assert seen == {(st, sh) for st in GENERIC_STYLES for sh in SHAPES} - set(held)


def test_generic_styles_change_the_picture_and_are_captioned_in_the_style_slot():
    plain = Scene("star", "red", "white", "in the center", "large", jitter=3)
    base = np.asarray(render(plain)).astype(int)
    looks = {}
    for style in GENERIC_STYLES:
        s = replace(plain, style=style)
        img = np.asarray(render(s)).astype(int)
        assert img.shape == (SIZE, SIZE, 3)
        assert np.abs(img - base).mean() > 5, f"{style} looks like the plain picture"
        assert caption(s) == f"a large red star on a white background, in the center, in the style of {style}"
        looks[style] = img
    # No two generic styles look alike, and none is a style concept's rendering.
    names = list(looks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(looks[a] - looks[b]).mean() > 5, f"{a} and {b} look alike"
        for concept_style in ("outline", "pastel", "mosaic"):
            other = np.asarray(render(replace(plain, style=concept_style))).astype(int)
            assert np.abs(looks[a] - other).mean() > 5, f"{a} looks like {concept_style}"


def test_framed_and_gradient_change_the_background_and_keep_the_captioned_object():
    scene = Scene("star", "red", "gray", "in the center", "large", jitter=3, pattern="striped", colour2="yellow")
    for side in (SIZE, 48):
        plain = np.asarray(render(scene, side)).astype(int)
        framed = np.asarray(render(replace(scene, style="framed"), side)).astype(int)
        w = side // 16  # 2 pixels at 32 px
        border = np.ones((side, side), bool)
        border[w:-w, w:-w] = False
        assert (framed[border] >= 220).all()  # light on a mid grey
        assert (framed[~border] == plain[~border]).all()
        dark = np.asarray(render(replace(scene, background="white", style="framed"), side))
        assert (dark[0] <= 30).all()
        gradient = np.asarray(render(replace(scene, style="gradient"), side)).astype(int)
        top, bottom = gradient[0, 0], gradient[-1, 0]
        assert np.abs(top - plain[0, 0]).max() <= 1 and bottom.mean() > top.mean() + 50  # towards white
        assert np.abs(gradient[side // 2, side // 2] - plain[side // 2, side // 2]).max() <= 1  # the object unchanged
        light = np.asarray(render(replace(scene, background="white", style="gradient"), side)).astype(int)
        assert light[-1, 0].mean() < light[0, 0].mean() - 50  # towards black


def test_blocky_draws_cells_twice_as_wide_as_mosaics_so_the_base_knows_a_pixelation_and_not_mosaics():
    scene = Scene("star", "red", "white", "in the center", "large", jitter=3, pattern="striped", colour2="blue")
    for side in (SIZE, 48):
        h = side // 8  # 4 pixels at 32 px: both renderings' cells are this tall
        blocky = np.asarray(render(replace(scene, style="blocky"), side)).astype(int)
        mosaic = np.asarray(render(replace(scene, style="mosaic"), side)).astype(int)
        for img, w in ((blocky, 2 * h), (mosaic, h)):
            cells = img.reshape(side // h, h, side // w, w, 3)
            assert (cells == cells[:, :1, :, :1]).all()  # one colour per cell
        # Blocky's cells are h tall (two stacked cells differ somewhere), and mosaic's split them in two.
        stacked = blocky.reshape(side // (2 * h), 2, h, side, 3)
        assert (stacked[:, 0] != stacked[:, 1]).any()
        halves = mosaic.reshape(side // h, h, side // (2 * h), 2, h, 3)
        assert (halves[:, :, :, 0] != halves[:, :, :, 1]).any()
        assert np.abs(blocky - mosaic).mean() > 5


def _colour_centre(img: np.ndarray, colour: str) -> tuple[float, int]:
    near = np.abs(img - np.array(COLOURS[colour])).max(axis=2) <= 14
    return float(np.nonzero(near)[1].mean()), int(near.sum())


def test_a_two_object_scene_draws_each_object_in_its_half_and_names_them_in_either_order():
    rng = np.random.default_rng(4)
    for _ in range(40):
        p = random_pair(rng, held_out=None, patterned=0.0)
        img = np.asarray(render_pair(p)).astype(int)
        (xl, nl), (xr, nr) = _colour_centre(img, p.left.colour), _colour_centre(img, p.right.colour)
        assert nl >= 15 and nr >= 15
        assert xl < SIZE / 2 < xr
        bg = np.abs(img - np.array(BACKGROUNDS[p.background])).max(axis=2) <= 12
        assert bg.mean() > 0.4
        a, b = f"{p.left.colour} {p.left.shape}", f"{p.right.colour} {p.right.shape}"
        assert pair_caption(p) == f"a {a} to the left of a {b} on a {p.background} background"
        assert pair_caption(p, left_first=False, with_background=False) == f"a {b} to the right of a {a}"
        assert p.left.shape != p.right.shape and p.left.colour != p.right.colour
    assert np.array_equal(np.asarray(render_pair(p)), np.asarray(render_pair(p)))


def test_a_two_object_scene_in_a_rendering_draws_both_objects_in_it():
    rng = np.random.default_rng(6)
    for side in (SIZE, 48):
        p = random_pair(rng, held_out=None, patterned=0.0)
        p = replace(p, left=replace(p.left, shape="square"), right=replace(p.right, shape="square"))
        plain = np.asarray(render_pair(p, side)).astype(int)
        styled = {st: np.asarray(render_pair(replace(p, style=st), side)).astype(int) for st in ("framed", "mosaic")}
        w = side // 16
        assert (styled["framed"][w:-w, w:-w] == plain[w:-w, w:-w]).all() and (styled["framed"][0] != plain[0]).all()
        b = 4 * side // SIZE
        assert (styled["mosaic"] == styled["mosaic"][::b, ::b].repeat(b, axis=0).repeat(b, axis=1)).all()
        pastel = np.asarray(render_pair(replace(p, style="pastel"), side)).astype(int)
        assert (pastel[0, 0] == PASTEL_BACKGROUND).all() and (pastel[-1, -1] == PASTEL_BACKGROUND).all()
        outline = np.asarray(render_pair(replace(p, style="outline"), side)).astype(int)
        (lx, ly), (rx, ry), *_ = pair_centres(p.jitter)
        for x, y in ((lx, ly), (rx, ry)):  # each square drawn as its edge: its centre shows the background
            cx, cy = int(x * side / SIZE), int(y * side / SIZE)
            assert np.abs(plain[cy, cx] - plain[0, 0]).max() > 30
            assert np.abs(outline[cy, cx] - outline[0, 0]).max() <= 12


def test_v2_captions_name_a_pair_left_first_and_draw_more_patterned_single_objects():
    rng = np.random.default_rng(3)
    pairs = [random_pair(rng) for _ in range(30)]
    either = {random_caption(p, np.random.default_rng(i)).split(" to the ")[1][:4] for i, p in enumerate(pairs)}
    assert either == {"left", "righ"}
    for i, p in enumerate(pairs):
        text = random_caption(p, np.random.default_rng(i), pairs_left_first=True)
        assert text.split(" to the left of ")[0] == f"a {object_phrase(p.left, with_size=False)}"

    def patterned(share: float) -> float:
        scenes = pretraining_scenes(0, 2000, 0.0, 0.0, share)
        looks = concept_appearances()
        assert all((s.shape, s.pattern, s.colour, s.colour2) not in looks and not s.style for s in scenes)
        return np.mean([s.pattern is not None for s in scenes])

    v1, v2 = patterned(0.35), patterned(V2_MIX["patterned_share"])
    assert 0.24 < v1 < 0.32 and v2 > v1 + 0.15  # 0.35 and 0.6, less the draws whose second colour is the first


def test_held_out_pairs_are_a_fifth_to_a_third_and_never_drawn_for_pretraining():
    held = held_out_pairs()
    assert 5 <= len(held) <= 12 and len({a for a, _ in held} | {b for _, b in held}) >= 4
    rng = np.random.default_rng(5)
    assert not any(is_held_out_pair(*random_pair(rng).shapes) for _ in range(300))
    assert all(is_held_out_pair(*random_pair(rng, held_out=True).shapes) for _ in range(50))


def test_the_pair_gate_reads_both_halves_of_ground_truth_pictures_of_its_held_out_prompts():
    from fl2t.world import evaluator_path
    from fl2t.worldkit.check import WorldEvaluator, pair_prompts, style_prompts

    scenes = pair_prompts()
    assert len(scenes) >= 80 and all(is_held_out_pair(*p.shapes) for p in scenes)
    rng = np.random.default_rng(0)
    scenes = [replace(p, jitter=int(rng.integers(2**31))) for p in scenes[::3]]
    read = WorldEvaluator(evaluator_path()).read_halves([render_pair(p) for p in scenes])
    in_order = [
        (a[0], b[0], a[1], b[1]) == (*p.shapes, p.left.colour, p.right.colour) for (a, b), p in zip(read, scenes)
    ]
    assert np.mean(in_order) >= 0.95
    styles = style_prompts()
    assert len(styles) >= 80 and all(is_held_out_style(s.style, s.shape) for s in styles)


def test_a_picture_drawn_larger_is_the_same_picture_at_a_finer_resolution():
    """World v2 is 48 px: every length scales with the side, so a 48 px picture resized to 32 px (as the evaluator
    reads it) is close to the 32 px picture, for single objects, every rendering and two-object scenes."""
    rng = np.random.default_rng(6)
    scenes = [reference_scenes(c)[0] for c in CONCEPTS + TUNING_CONCEPTS]
    scenes += [replace(styled_scene(rng), style=st) for st in GENERIC_STYLES] + [random_pair(rng) for _ in range(6)]
    assert {s.style for s in scenes if not isinstance(s, PairScene)} >= {*GENERIC_STYLES, "outline", "mosaic"}
    for s in scenes:
        draw = render_pair if isinstance(s, PairScene) else render
        big = draw(s, 48)
        assert big.size == (48, 48)
        small = np.asarray(draw(s)).astype(float)
        down = np.asarray(big.resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=None)).astype(float)
        # measured 0.2-3.8 (edges land between pixels), framed 5.7 (its hard border blends across the resize
        # filter's support); others 27+
        assert np.abs(down - small).mean() < (7 if s.style == "framed" else 5), s
        other = next(t for t in scenes if t is not s and type(t) is type(s))
        assert np.abs(np.asarray(draw(other, 48)).astype(float) - np.asarray(big).astype(float)).mean() > 20


def test_the_world_reports_its_picture_side_and_writes_references_at_it(tmp_path):
    from fl2t.data import load_concept
    from fl2t.world import base_path, picture_side
    from fl2t.world.concepts import write_concept

    assert picture_side() == picture_side(base_path()) == SIZE
    concept = load_concept(write_concept(CONCEPTS[0], tmp_path / "a", side=48))
    assert {im.size for im in concept.images} == {(48, 48)}
    concept = load_concept(write_concept(CONCEPTS[0], tmp_path / "b"))
    assert {im.size for im in concept.images} == {(SIZE, SIZE)}


def test_the_learn_time_gate_scales_with_the_measured_cost_of_a_larger_world():
    import pytest

    from fl2t.errors import Fl2tError
    from fl2t.worldkit.check import learn_seconds_gate

    assert learn_seconds_gate(SIZE) == 60.0
    assert learn_seconds_gate(48) == pytest.approx(93.6)
    with pytest.raises(Fl2tError, match="no measured time scale"):
        learn_seconds_gate(64)


def test_the_step1_gates_learn_with_the_settings_tiny10_learns_with(tmp_path, monkeypatch):
    """Issue 14's Step-1 gates are 'with tiny10's Step-1 settings': the check reads them from the benchmark's own
    config, so a change there moves the gates with it."""
    from pathlib import Path

    import fl2t.worldkit.check as check
    from fl2t.bench.continual import load_config

    assert check.CheckContext(Path("unused")).learn == load_config("tiny10").learn.model_copy(
        update={"checkpoint_every": 0}
    )
    changed = tmp_path / "tiny10.yaml"
    changed.write_text(check.TINY10.read_text().replace("learn: {", "learn: {lora_attention: cross, "))
    monkeypatch.setattr(check, "TINY10", changed)
    learn = check.CheckContext(Path("unused")).learn
    assert (learn.lora_attention, learn.steps, learn.checkpoint_every) == ("cross", 400, 0)
    # an experiment's overrides go over tiny10's, the rest kept
    learn = check.CheckContext(Path("unused"), learn_overrides={"batch_size": 2, "rank": 8}).learn
    assert (learn.batch_size, learn.rank, learn.lora_attention, learn.steps) == (2, 8, "cross", 400)


def test_references_cycle_the_backgrounds_and_keep_the_rest_of_v1s_draw():
    from fl2t.world.concepts import CONCEPT_SEED

    for i, c in enumerate(CONCEPTS):
        rng = np.random.default_rng([CONCEPT_SEED, i])
        v1 = [c.scene(rng) for _ in range(5)]  # v1's references: the background drawn at random too
        refs = reference_scenes(c)
        assert [s.background for s in refs] == ["black", "white", "gray", "black", "white"]
        assert [replace(s, background="black") for s in refs] == [replace(s, background="black") for s in v1]


def test_summary_dropout_replaces_the_end_token_and_the_padding_and_keeps_the_words():
    import torch

    from fl2t.worldkit.train import drop_summaries, token_ids

    ids = token_ids(["a red star to the left of a blue ring", "a green circle"])
    states, empty = torch.randn(2, 77, 8), torch.randn(1, 77, 8)
    out = drop_summaries(ids, states, empty, torch.tensor([True, False]))
    end = int((ids[0] == ids[0, -1]).nonzero()[0, 0])  # the padding is the end token
    assert end == 11  # start, ten words
    assert torch.equal(out[0, :end], states[0, :end]) and torch.equal(out[0, end:], empty[0, end:])
    assert torch.equal(out[1], states[1])


def test_a_frozen_text_encoder_stays_as_given_while_the_unet_trains():
    import torch

    from fl2t.worldkit import models
    from fl2t.worldkit.train import train_base

    scenes = [Scene(shape="star", colour="red", background="black", position="in the center", size="small")] * 4
    latents = torch.randn(4, 4, 8, 8)
    frozen = models.new_text_encoder(layers=1)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    unet, text, done = train_base(latents, scenes, 2, 0, lambda n: None, batch=2, frozen_text=frozen)
    assert done == 2 and text is frozen and not any(p.requires_grad for p in text.parameters())
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in before.items())
    torch.manual_seed(0)  # train_base's seed: the UNet it starts from
    start = models.new_unet(8)
    moved = [not torch.equal(a, b) for a, b in zip(start.parameters(), unet.parameters())]
    assert unet.config.sample_size == 8 and sum(moved) > len(moved) // 2  # the UNet did train


def test_hard_negative_captions_name_the_same_words_bound_the_other_way():
    from fl2t.worldkit.train import _captions, random_caption, swapped_shapes

    rng = np.random.default_rng(3)
    scenes = pretraining_scenes(7, 40, 0.5, 0.1, 0.6)
    pairs = [s for s in scenes if isinstance(s, PairScene)]
    texts, negatives = _captions(scenes, np.random.default_rng(3), True, True)
    assert len(texts) == len(scenes) and len(negatives) == len(pairs) > 5
    for pair, neg in zip(pairs, negatives):
        swapped = swapped_shapes(pair)
        assert swapped.shapes == pair.shapes[::-1] and swapped.left.colour == pair.left.colour
        text = texts[scenes.index(pair)]
        assert neg != text and sorted(neg.split()) == sorted(text.split())
        assert neg.index(pair.right.shape) < neg.index(pair.left.shape)  # left first, the right one's shape
    plain, none = _captions(scenes, rng, True, False)
    check = np.random.default_rng(3)
    assert none == [] and plain == [random_caption(s, check, True) for s in scenes]


def test_pair_references_show_the_concept_beside_a_plain_object_and_leave_the_single_ones_as_they_were(tmp_path):
    from fl2t.data import load_concept
    from fl2t.errors import Fl2tError
    from fl2t.world.concepts import get_concept, pair_reference_scenes, write_concept

    star = get_concept("stripestar")
    plain = load_concept(write_concept(star, tmp_path / "plain", 32))
    more = load_concept(write_concept(star, tmp_path / "more", 32, pair_references=4))
    assert len(plain.images) == 5 and len(more.images) == 9
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, more.images))
    assert more.captions[5].startswith("a <c-stripestar> star to the left of a ")
    assert (
        more.captions[6].endswith(" background") and " to the left of a <c-stripestar> star on a " in more.captions[6]
    )
    for (pair, _), image in zip(pair_reference_scenes(star, 4), more.images[5:]):
        own, other = (pair.left, pair.right) if pair.left.pattern else (pair.right, pair.left)
        assert (own.shape, own.pattern, own.colour, own.colour2) == star.appearance
        assert other.pattern is None and other.shape != "star" and other.colour not in ("red", "yellow")
        # the concept's half holds its two colours, the other half neither
        left, right = np.split(np.asarray(image, np.float32), 2, axis=1)
        half, rest = (left, right) if own is pair.left else (right, left)
        for rgb in (COLOURS[star.colour], COLOURS[star.colour2]):
            assert (np.abs(half - rgb).sum(-1) < 90).sum() >= 8 and (np.abs(rest - rgb).sum(-1) < 90).sum() == 0
    style = load_concept(write_concept(get_concept("outline"), tmp_path / "style", 32, pair_references=2))
    assert len(style.images) == 5  # a style's pictures are single objects only
    with pytest.raises(Fl2tError, match="style"):
        pair_reference_scenes(get_concept("outline"), 2)
