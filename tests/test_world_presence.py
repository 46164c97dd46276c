"""The tiny world's presence score (fl2t.world.presence) on ground-truth renders no bank holds."""

from dataclasses import replace

import numpy as np
import pytest

from fl2t import world
from fl2t.errors import Fl2tError
from fl2t.metrics import ClipEvaluator
from fl2t.world.concepts import CONCEPTS, get_concept
from fl2t.world.generator import BACKGROUNDS, PairScene, Scene, render, render_pair
from fl2t.world.presence import Presence, validation

OBJECTS = [c for c in CONCEPTS if c.kind == "object"]


@pytest.fixture(scope="module")
def evaluator():
    return ClipEvaluator.load(world.evaluator_path())


@pytest.fixture(scope="module")
def presence(evaluator):
    return Presence(evaluator)


def look(c, plain=False):
    return Scene(
        c.shape, c.colour, "black", "in the center", "small", *((None, None) if plain else (c.pattern, c.colour2))
    )


def pairs(n=20, seed=123):
    """n random ordered pairs of two different object concepts, each a PairScene on a random background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i, j = rng.choice(len(OBJECTS), 2, replace=False)
        bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        out.append(
            (OBJECTS[i], OBJECTS[j], PairScene(look(OBJECTS[i]), look(OBJECTS[j]), bg, int(rng.integers(2**31))))
        )
    return out


def test_two_object_concepts_found_and_a_plain_swap_absent(presence):
    both, absent = [], []
    for a, b, pair in pairs():
        got = presence([render_pair(pair)], [a.name, b.name])
        assert got.shape == (1, 2) and got.dtype == bool
        both.append(got.all())
        swapped = replace(pair, right=look(b, plain=True))  # b's shape and main colour, no pattern
        got = presence([render_pair(swapped)], [a.name, b.name])[0]
        absent.append(got[0] and not got[1])
    assert np.mean(both) >= 0.85, np.mean(both)
    assert np.mean(absent) >= 0.85, np.mean(absent)


def test_object_in_pastel_found_both_and_plain_rendering_has_no_style(presence):
    rng = np.random.default_rng(456)
    both, style_absent = [], []
    for name in ("stripestar", "bullseye", "crossbox"):
        c = get_concept(name)
        scenes = [replace(c.scene(rng), style="pastel") for _ in range(7)]
        got = presence([render(s) for s in scenes], [name, "pastel"])
        both += list(got.all(axis=1))
        got = presence([render(replace(s, style=None)) for s in scenes], [name, "pastel"])
        style_absent += list(~got[:, 1])
    assert np.mean(both) >= 0.85, np.mean(both)
    assert np.mean(style_absent) >= 0.85, np.mean(style_absent)


def test_deterministic_and_empty(evaluator):
    images = [render_pair(p) for _, _, p in pairs(4, seed=7)]
    names = ["stripestar", "eyering", "dottri", "pastel"]
    first = Presence(evaluator, bank_size=8)(images, names)
    again = Presence(evaluator, bank_size=8)(images, names)
    np.testing.assert_array_equal(first, again)
    assert Presence(evaluator)(images, []).shape == (4, 0)


def test_unknown_name_is_a_clear_error(presence):
    with pytest.raises(Fl2tError, match="no world concept named 'zebra'.*stripestar"):
        presence([render(OBJECTS[0].scene(np.random.default_rng(0)))], ["stripestar", "zebra"])


def test_validation_leaves_out_only_pictures_equal_to_their_plain_object_picture():
    """Bullseye in outline is drawn exactly as a plain purple circle in outline: no score can find it there and
    report the plain circle's picture without it, so the validation leaves that combination out, and only it."""
    shown: list[int] = []

    def every_concept_present(images, names):
        shown.append(len(images))
        return np.ones((len(images), len(names)), dtype=bool)

    v = validation(None, seeds=0, style_seeds=2, presence=every_concept_present)
    objects, styles = len(OBJECTS), len(CONCEPTS) - len(OBJECTS)
    assert v["n/styled/invisible"] == 2  # bullseye + outline, both seeds
    assert v["n/styled/both"] == objects * styles * 2 - 2
    assert "styled/object_absent/bullseye+outline" not in v
    assert v["n/styled/object_absent/bullseye+pastel"] == 2 and v["n/styled/object_absent/checkdiamond+outline"] == 2
    assert len(shown) == objects * styles * 2 - 2
