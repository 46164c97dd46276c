"""Step 2's pairs: which are trained (by pair hash), the composition teachers, the pair anchors kept for reuse."""

import pytest
import torch

from conftest import STEP2
from fl2t.consolidate import canonical, consolidate
from fl2t.consolidate.model import PAIR_ANCHORS_NAME, ConsolidatedModel
from fl2t.consolidate.pairs import AttentionProbe, routed_prediction, trained_pairs
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.library import Library
from fl2t.models import load_base
from fl2t.text import set_layerwise_processors


def test_trained_pairs_come_from_pair_hashes_and_a_new_concept_does_not_reshuffle_them(four_experts):
    settings = STEP2.model_copy(update={"pairs_per_concept": 1})
    three = canonical(four_experts[:3])
    four = canonical(four_experts)
    names = lambda experts, pairs: {(experts[p.first].name, experts[p.second].name): p.key for p in pairs}  # noqa: E731
    small, large = names(three, trained_pairs(three, settings)), names(four, trained_pairs(four, settings))
    assert 1 <= len(small) <= 3 and len(large) <= 4
    kept = set(small) & set(large)
    assert kept and all(small[p] == large[p] for p in kept)  # same pair, same prompts, seed and cache key
    # A pair of the three leaves only for a pair with the fourth concept (it displaced it as a lowest hash).
    new = four_experts[3].name
    assert all(any(new in q for q in set(large) - set(small)) for _ in set(small) - set(large))
    everything = trained_pairs(four, STEP2.model_copy(update={"pairs_per_concept": 3}))
    assert len(everything) == 6 and len({p.key for p in everything}) == 6


@pytest.fixture(scope="module")
def armed(four_experts, tiny_base):
    pipe = load_base(str(tiny_base))
    experts = canonical(four_experts)
    stack = stack_experts(experts, pipe.unet)
    return pipe, experts, AggregatedLoRA(pipe.unet, stack), AttentionProbe(pipe.unet)


def test_the_attention_probe_computes_what_the_default_attention_computes(armed):
    pipe, _, _, probe = armed
    g = torch.Generator().manual_seed(0)
    x, t, states = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100, 600]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        plain = pipe.unet(x, t, states).sample
        with probe.recording():
            recorded = pipe.unet(x, t, states).sample
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert probe.maps and all(m.shape[0] == 2 and m.shape[-1] == 77 for m in probe.maps)
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in probe.maps)  # probabilities over the tokens
    mass = probe.mass(torch.zeros(2, 77, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True), (16, 16))
    assert mass.shape == (2, 1, 16, 16) and torch.allclose(mass.amax(dim=(-2, -1)), torch.ones(2))
    assert not probe.maps
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, states).sample, plain)  # the default processors are back


def test_the_attention_probe_reads_a_layerwise_layers_own_slice_of_the_text_states(tiny_base):
    pipe = load_base(str(tiny_base))
    n = set_layerwise_processors(pipe.unet)
    probe = AttentionProbe(pipe.unet)
    g = torch.Generator().manual_seed(2)
    x, t, states = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300]), torch.randn(1, n * 77, 32, generator=g)
    with torch.no_grad():
        plain = pipe.unet(x, t, states).sample
        with probe.recording():
            recorded = pipe.unet(x, t, states).sample
    assert torch.allclose(plain, recorded, atol=1e-5) and all(m.shape[-1] == 77 for m in probe.maps)


def test_the_routed_teacher_is_each_expert_where_its_tokens_are_attended_and_the_base_elsewhere(armed):
    pipe, experts, agg, probe = armed
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([400])
    states = torch.randn(1, 77, 32, generator=g)
    spans = torch.zeros(1, len(experts), 77, dtype=torch.bool)
    spans[0, 0, 4], spans[0, 1, 7] = True, True
    with torch.no_grad():
        base = pipe.unet(x, t, states).sample
        routed = routed_prediction(pipe.unet, agg, probe, x, t, states, spans, [(0, 1)])
        nowhere = routed_prediction(pipe.unet, agg, probe, x, t, states, torch.zeros_like(spans), [(0, 1)])
        alone = []
        for k in (0, 1):
            one = torch.zeros(1, len(agg.stack.modules), len(experts))
            one[..., k] = 1.0
            agg.set(one)
            alone.append(pipe.unet(x, t, states).sample)
            agg.off()
    assert torch.allclose(nowhere, base, atol=1e-6)  # no attention on any token of theirs: the base model
    # Per element a convex mix of the base and the two experts alone, and not the base.
    lo = torch.minimum(torch.minimum(base, alone[0]), alone[1]) - 1e-5
    hi = torch.maximum(torch.maximum(base, alone[0]), alone[1]) + 1e-5
    assert ((routed >= lo) & (routed <= hi)).all() and (routed - base).abs().max() > 1e-4


@pytest.mark.parametrize("teacher", ["span", "routed"])
def test_pair_anchors_are_kept_beside_the_model_and_reused(four_experts, tmp_path, teacher, monkeypatch):
    lib = Library(tmp_path / "lib")
    for e in four_experts[:2]:
        lib.add(e)
    settings = STEP2.model_copy(update={"steps": 2, "pair_teacher": teacher, "pair_share": 0.25})
    model = consolidate(lib, settings)
    assert len(model.pair_anchors) == 1
    (latents,) = model.pair_anchors.values()
    assert latents.shape == (settings.pair_anchors, 4, 16, 16) and latents.abs().sum() > 0
    lib.save_consolidated(model.save_pretrained)
    kept = ConsolidatedModel.load_pair_anchors(lib.consolidated_dir())
    assert kept.keys() == model.pair_anchors.keys()
    assert (lib.consolidated_dir() / PAIR_ANCHORS_NAME).is_file()

    def generate(*args):
        raise AssertionError("the kept pair anchors were generated again")

    monkeypatch.setattr("fl2t.consolidate.train.pair_anchors", generate)
    again = consolidate(lib, settings.model_copy(update={"seed": 1}))
    assert all(torch.equal(again.pair_anchors[k], v) for k, v in kept.items())
