"""`cidm` as published (attn2 LoRA, layer-wise embeddings, orthogonality loss, per-layer EWA) and `cidm+tokens`."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import FAST
from fl2t.data import ConceptSpec, load_concept
from fl2t.errors import Fl2tError
from fl2t.expert import Expert
from fl2t.fusion import stack_experts
from fl2t.methods import METHODS, MethodContext
from fl2t.methods.cidm import EWA_SCALE, CIDMSettings, ElasticWeights, _Orthogonal, module_layers
from fl2t.models import load_base
from fl2t.pipeline import ExpertPipeline
from fl2t.text import cross_attention_processor_names

TINY = FAST.model_copy(update={"steps": 2, "num_anchors": 0, "checkpoint_every": 0})


def _pipe(tiny_base) -> ExpertPipeline:
    pipe = ExpertPipeline(**load_base(str(tiny_base)).components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _token_expert(name: str, embeddings: torch.Tensor) -> Expert:
    """An expert with one layer-wise token (embeddings (L, 1, d)) and no LoRA: all EWA reads."""
    spec = ConceptSpec(name=name, tokens=[f"<{name}>"], class_word="ball")
    return Expert(spec, {}, embeddings, None, None, [], {})


def _ewa(tiny_base, embeddings: list[torch.Tensor]) -> ElasticWeights:
    pipe = _pipe(tiny_base)
    experts = [_token_expert(f"c-{g}", e) for g, e in enumerate(embeddings)]
    for e in experts:
        pipe.add_expert_tokens(e)
    return ElasticWeights(pipe, experts)


def _distinct(n_layers: int, d: int, g: int) -> torch.Tensor:
    """Concept g's embedding in every layer: a large basis vector of its own, so the text states separate."""
    return (10 * torch.eye(d)[g]).expand(n_layers, 1, d).clone()


@pytest.fixture(scope="module")
def n_layers_dim(tiny_base) -> tuple[int, int]:
    pipe = load_base(str(tiny_base))
    return len(cross_attention_processor_names(pipe.unet)), pipe.text_encoder.config.hidden_size


def test_ewa_prefers_the_named_concept_when_the_text_encoder_separates_concepts(tiny_base, n_layers_dim):
    L, d = n_layers_dim
    ewa = _ewa(tiny_base, [_distinct(L, d, g) for g in range(3)])
    for g in range(3):
        w = ewa(f"a photo of <c-{g}> ball")  # (L, G)
        assert w.shape == (L, 3)
        assert (w.argmax(-1) == g).all(), w
        assert (w[:, g] > 0.9).all(), w


def test_ewa_weights_are_l1_normalised_per_layer(tiny_base, n_layers_dim):
    L, d = n_layers_dim
    torch.manual_seed(0)
    ewa = _ewa(tiny_base, [torch.randn(L, 1, d) for _ in range(3)])
    for prompt in ("a photo of <c-1> ball", "a photo of a ball", "<c-0> and <c-2>"):
        w = ewa(prompt)
        assert (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(L), atol=1e-5), w


def test_ewa_is_per_layer_each_layer_encoding_with_its_own_embeddings(tiny_base, n_layers_dim):
    """Layer 0: both concepts share one embedding (EWA cannot tell them apart there); the other layers: distinct.
    The named concept wins only where its embedding is its own."""
    L, d = n_layers_dim
    a, b = _distinct(L, d, 0), _distinct(L, d, 1)
    b[0] = a[0]
    ewa = _ewa(tiny_base, [a, b])
    w = ewa("a photo of <c-1> ball")
    assert (w[1:, 1] > 0.9).all(), w
    assert w[0, 1] < 0.6, w  # a tie up to the tokens' positions
    assert (w[1:, 1] - w[0, 1] > 0.3).all()


def test_orthogonality_loss_is_zero_for_orthogonal_up_weights_and_positive_otherwise():
    old = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])  # (out 3, r 2): rows along e0
    previous = [SimpleNamespace(modules=["m"], lora={"m.lora_B.weight": old})]
    reg = _Orthogonal(previous, lam=0.1)

    class Lora(nn.Module):  # the peft layout `lora_layers` reads
        def __init__(self, b: torch.Tensor) -> None:
            super().__init__()
            self.lora_A = nn.ModuleDict({"default": nn.Linear(4, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 3, bias=False)})
            self.lora_B["default"].weight.data = b

    unet = nn.Module()
    unet.m = Lora(torch.tensor([[0.0, 1.0], [0.0, -3.0], [0.0, 0.5]]))  # rows along e1: B_new B_oldᵀ = 0
    reg.start(SimpleNamespace(unet=unet), None)
    assert reg.loss(None, None, None).item() == 0.0
    unet.m.lora_B["default"].weight.data[0, 0] = 1.0  # B_new B_oldᵀ row 0 = [1, 2, 0]: mean |.| over 9 = 1/3
    loss = reg.loss(None, None, None)
    assert loss.item() == pytest.approx(0.1 / 3)
    loss.backward()
    assert unet.m.lora_B["default"].weight.grad.abs().sum() > 0


def test_module_layers_give_each_attn2_block_its_own_layer(tiny_base, n_layers_dim):
    L, _ = n_layers_dim
    unet = load_base(str(tiny_base)).unet
    blocks = [k.removesuffix(".processor") for k in cross_attention_processor_names(unet)]
    modules = [f"{b}.{p}" for b in reversed(blocks) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    layers = module_layers(unet, modules)
    assert layers.tolist() == [i for i in reversed(range(L)) for _ in range(4)]
    with pytest.raises(Fl2tError, match="cross-attention only"):
        module_layers(unet, [blocks[0].replace("attn2", "attn1") + ".to_q"])


@pytest.fixture(scope="module")
def cidm_state(tmp_path_factory, tiny_base, concepts_root, n_layers_dim):
    """cidm after two tasks, learned with 2 steps each; the orthogonality loss's values recorded per task."""
    workdir = tmp_path_factory.mktemp("cidm") / "state"
    ctx = MethodContext(base=str(tiny_base), learn=TINY, workdir=workdir, store=workdir.parent / "store", device="cpu")
    seen: list[list[float]] = []
    loss = _Orthogonal.loss

    def recorded(self, *args):
        value = loss(self, *args)
        seen[-1].append(value.item())
        return value

    mp = pytest.MonkeyPatch()
    mp.setattr(_Orthogonal, "loss", recorded)
    method = METHODS["cidm"](ctx)
    try:
        for name in ("c-stripeball", "c-checkbox"):
            seen.append([])
            method.learn(load_concept(concepts_root / name))
    finally:
        mp.undo()
    return ctx, seen


def test_cidm_learns_attn2_lora_layerwise_embeddings_and_the_orthogonality_loss(cidm_state, n_layers_dim):
    ctx, seen = cidm_state
    L, d = n_layers_dim
    experts = METHODS["cidm"](ctx).experts()
    assert [e.name for e in experts] == ["c-stripeball", "c-checkbox"]
    for e in experts:
        assert e.modules and all(".attn2." in m for m in e.modules)
        assert len(e.modules) == 4 * L  # to_q, to_k, to_v, to_out.0 of every cross-attention layer
        assert e.token_embeddings.shape == (L, 1, d)
        assert e.settings["steps"] == TINY.steps and e.settings["rank"] == TINY.rank  # the benchmark's budget
    assert seen[0] == []  # task 1: no earlier LoRA to be orthogonal to
    assert len(seen[1]) == TINY.steps and max(seen[1]) > 0


def test_cidm_module_weights_are_ewa_per_layer_at_0_8_and_tokens_give_the_named_concept_0_8(cidm_state):
    ctx, _ = cidm_state
    cidm, tokens = METHODS["cidm"](ctx), METHODS["cidm+tokens"](ctx)  # one state: the same experts
    experts = cidm.experts()
    pipe = cidm.base_pipeline(experts)
    layers = module_layers(pipe.unet, stack_experts(experts, pipe.unet).modules)
    ewa, routed = cidm.module_weights(pipe, experts), tokens.module_weights(pipe, experts)

    named = "a photo of <c-checkbox> box"
    w = ewa(named)  # (M, G)
    assert w.shape == (len(layers), 2)
    assert torch.allclose(w.sum(-1), torch.full((len(layers),), EWA_SCALE), atol=1e-5)
    for layer in layers.unique():
        rows = w[layers == layer]
        assert torch.equal(rows, rows[:1].expand_as(rows))  # one block's modules share its layer's weights
    per_layer = cidm.layer_weights(ElasticWeights(pipe, experts), named)  # (L, G)
    assert not torch.allclose(per_layer, per_layer[:1].expand_as(per_layer))  # the layers' embeddings differ
    assert torch.allclose(w, EWA_SCALE * per_layer[layers])
    assert (w[:, 1] < EWA_SCALE - 1e-3).all()  # this random text encoder does not separate the two concepts

    assert torch.equal(routed(named), torch.tensor([[0.0, EWA_SCALE]]).expand(len(layers), -1))
    assert torch.equal(routed("a photo of a box"), torch.zeros(len(layers), 2))  # naming none: the base model
    both = routed("<c-stripeball> ball and <c-checkbox> box")
    assert (both > 0).all() and torch.allclose(both.sum(-1), torch.full((len(layers),), EWA_SCALE), atol=1e-5)

    # `ewa_scale` (a setting, for the tuning sweep) scales the aggregated update
    half = dataclasses.replace(ctx, settings=CIDMSettings(ewa_scale=0.4))
    assert torch.allclose(METHODS["cidm"](half).module_weights(pipe, experts)(named), 0.5 * w)


def test_cidm_and_cidm_tokens_sample(cidm_state):
    ctx, _ = cidm_state
    for name in ("cidm", "cidm+tokens"):
        images = METHODS[name](ctx).sampler()(["a photo of <c-checkbox> box", "a photo of a box"], [0, 1], steps=2)
        assert [im.size for im in images] == [(32, 32), (32, 32)]
