"""Span-restricted cross-attention keys and values (`fl2t.span`) and the `lookup+span` reference method.

Experts here are made by hand on the tests' tiny random base (tests/conftest.py): random low-rank factors large
enough to show in a 3-step image, on chosen UNet layers, with one or two tokens, plain or layer-wise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl2t.data import ConceptSpec
from fl2t.expert import Expert
from fl2t.fusion import stack_experts
from fl2t.methods import METHODS
from fl2t.methods.base import MethodContext
from fl2t.models import load_base
from fl2t.pipeline import ExpertPipeline
from fl2t.sampling import Sampler
from fl2t.span import SpanKV, is_key_value, prompt_ids
from fl2t.text import cross_attention_processor_names

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _layers(unet: torch.nn.Module, keep) -> list[str]:
    return sorted(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn" in n and keep(n))


def _expert(unet, d: int, name: str, tokens: list[str], modules: list[str], seed: int, layers: int = 0) -> Expert:
    """An expert with random rank-2 factors on `modules`; layer-wise token embeddings when `layers` > 0."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for m in modules:
        lin = unet.get_submodule(m)
        lora[f"{m}.lora_A.weight"] = torch.randn(2, lin.in_features, generator=gen) / lin.in_features**0.5
        lora[f"{m}.lora_B.weight"] = torch.randn(lin.out_features, 2, generator=gen) * 0.5
    shape = (layers, len(tokens), d) if layers else (len(tokens), d)
    return Expert(
        spec=ConceptSpec(name=name, tokens=tokens, class_word="ball"),
        lora=lora,
        token_embeddings=torch.randn(*shape, generator=gen),
        stable_embedding=torch.zeros(d),
        anchors=torch.zeros(1, 4, 16, 16),
        anchor_prompts=["a photo of a ball"],
        base={},
    )


@pytest.fixture(scope="module")
def experts(tiny_base) -> dict[str, Expert]:
    pipe = load_base(str(tiny_base))
    unet, d = pipe.unet, pipe.text_encoder.config.hidden_size
    n_layers = len(cross_attention_processor_names(unet))
    every = _layers(unet, lambda n: True)
    return {
        "two": _expert(unet, d, "c-two", ["<c-two-a>", "<c-two-b>"], every, 1),
        "one": _expert(unet, d, "c-one", ["<c-one>"], every, 2),
        "layerwise": _expert(unet, d, "c-lw", ["<c-lw>"], every, 3, layers=n_layers),
        "kv": _expert(unet, d, "c-kv", ["<c-kv>"], _layers(unet, is_key_value), 4),
        "no-kv": _expert(unet, d, "c-nokv", ["<c-nokv>"], _layers(unet, lambda n: not is_key_value(n)), 5),
    }


def _pipe(tiny_base, experts: list[Expert]) -> ExpertPipeline:
    pipe = ExpertPipeline(**load_base(str(tiny_base)).components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for e in experts:
        pipe.add_expert_tokens(e)
    return pipe


def _recorded(unet, modules: list[str], run) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each module's input and output during `run()`, seen by hooks registered after the span's."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        return lambda mod, args, out: seen.__setitem__(name, (args[0].clone(), out.clone()))

    handles = [unet.get_submodule(m).register_forward_hook(keep(m)) for m in modules]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("second", ["one", "layerwise"])
def test_span_keys_and_values_are_the_base_models_outside_each_named_concepts_tokens(tiny_base, experts, second):
    chosen = [experts["two"], experts[second]]
    pipe = _pipe(tiny_base, chosen)
    unet, tok = pipe.unet, pipe.tokenizer
    stack = stack_experts(chosen, unet)
    token_ids = [tok.convert_tokens_to_ids(e.spec.tokens) for e in chosen]
    span = SpanKV(unet, stack, token_ids)
    t2 = " ".join(chosen[1].spec.tokens)
    prompts = [
        f"a photo of <c-two-a> <c-two-b> ball next to {t2} box",  # both concepts; <c-two> has two tokens
        f"{t2} on a table",
        "a photo of <c-two-a> ball",  # one of <c-two>'s two tokens: the concept is not named
        "a photo of a ball",
    ]
    ids = prompt_ids(tok, prompts)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    states = torch.cat([uncond, cond])  # classifier-free guidance: [unconditional; conditional]
    latents = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    alpha = torch.full((4, len(stack.modules), 2), 0.7)

    rest = span.arm(ids, alpha)
    kv = [m for m in stack.modules if is_key_value(m)]
    assert len(kv) == 2 * len(cross_attention_processor_names(unet))
    named = torch.tensor([[1, 1], [0, 1], [0, 0], [0, 0]], dtype=torch.bool)
    for row in range(len(stack.modules)):
        want = alpha[:, row] * (~named if is_key_value(stack.modules[row]) else torch.ones_like(named))
        assert torch.equal(rest[:, row], want)  # named experts' key/value update leaves the fused rest

    with torch.no_grad():
        armed = _recorded(unet, kv, lambda: unet(latents, 500, states))
        span.off()
        base = _recorded(unet, kv, lambda: unet(latents, 500, states))

    spans = span.spans(ids)  # (B, G, T)
    assert spans[0].sum(-1).tolist() == [2, len(chosen[1].spec.tokens)] and spans[2, 0].sum() == 1
    inside = (spans & named[..., None]).any(1)  # (B, T): a named concept's token
    for m in kv:
        x, k_armed = armed[m]
        x_base, k_base = base[m]
        assert torch.equal(x, x_base)  # the same text states (layer-wise: this layer's slice)
        assert x.shape == (8, 77, 32)
        assert torch.equal(k_armed[:4], k_base[:4])  # the unconditional half: no update
        cond_armed, cond_base = k_armed[4:], k_base[4:]
        assert torch.equal(cond_armed[~inside], cond_base[~inside])  # exactly the base outside the spans
        expected = cond_base.clone()
        for g, e in enumerate(chosen):
            delta = x[4:] @ e.lora[f"{m}.lora_A.weight"].T @ e.lora[f"{m}.lora_B.weight"].T
            where = spans[:, g] & named[:, g, None]
            expected[where] += 0.7 * delta[where]
        torch.testing.assert_close(cond_armed, expected, rtol=1e-5, atol=1e-5)
        assert (cond_armed[inside] - cond_base[inside]).abs().amax(-1).min() > 1e-3  # every span token moved


def test_the_update_is_computed_once_per_states_tensor_and_again_when_the_states_change(tiny_base, experts):
    chosen = [experts["kv"]]
    pipe = _pipe(tiny_base, chosen)
    stack = stack_experts(chosen, pipe.unet)
    span = SpanKV(pipe.unet, stack, [pipe.tokenizer.convert_tokens_to_ids(["<c-kv>"])])
    calls = []
    compute = span._delta
    span._delta = lambda k, name, x: (calls.append(name), compute(k, name, x))[1]
    m = stack.modules[0]
    lin = pipe.unet.get_submodule(m)
    ids = prompt_ids(pipe.tokenizer, ["<c-kv> ball"])
    span.arm(ids, torch.ones(1, len(stack.modules), 1))
    x = torch.randn(2, 77, 32)

    def by_hand(states):
        a, b = experts["kv"].lora[f"{m}.lora_A.weight"], experts["kv"].lora[f"{m}.lora_B.weight"]
        out = torch.nn.functional.linear(states, lin.weight, lin.bias)
        out[1, 1] += states[1, 1] @ a.T @ b.T  # <c-kv> is token 1 of the conditional prompt
        return out

    with torch.no_grad():
        first, again = lin(x), lin(x)
        assert torch.equal(first, again) and calls == [m]
        torch.testing.assert_close(first, by_hand(x))
        x[1, 1] += 1.0  # the same tensor changed in place: computed again
        torch.testing.assert_close(lin(x), by_hand(x))
        y = torch.randn(2, 77, 32)
        torch.testing.assert_close(lin(y), by_hand(y))
        assert calls == [m, m, m]
        cond = x[1:].clone()  # armed for guidance, one row per prompt: the conditional prediction alone (fidelity)
        torch.testing.assert_close(lin(cond), by_hand(torch.cat([x[:1], cond]))[1:])
        calls.pop()
        span.arm(ids, torch.ones(1, len(stack.modules), 1), guided=False)  # no guidance: every row conditional
        out = lin(torch.stack([x[1], x[1]]))  # two images of the prompt
        torch.testing.assert_close(out, torch.stack([by_hand(x)[1]] * 2))
        with pytest.raises(ValueError, match="got text states"):
            lin(torch.randn(1, 76, 32))
        span.remove()
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_in_a_sampling_loop_the_update_is_computed_once_and_the_unconditional_half_gets_none(
    tiny_base, experts, tmp_path, monkeypatch
):
    """Through diffusers' own pipeline call: its guidance batch layout, its text states reused at every step."""
    ctx = MethodContext(base=str(tiny_base), learn=None, workdir=tmp_path / "m", store=tmp_path / "s", device="cpu")
    method = METHODS["lookup+span"](ctx)
    method.experts = lambda: [experts["kv"]]
    sampler = method.sampler()
    kv = _layers(sampler.pipe.unet, is_key_value)
    computed, compute = [], SpanKV._delta
    monkeypatch.setattr(SpanKV, "_delta", lambda self, k, m, x: (computed.append(m), compute(self, k, m, x))[1])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    lin = sampler.pipe.unet.get_submodule(kv[0])
    handle = lin.register_forward_hook(lambda mod, args, out: seen.append((args[0].clone(), out.clone())))
    sampler(["a photo of <c-kv> ball", "a photo of a ball"], [0, 1], steps=3)
    handle.remove()
    assert sorted(computed) == kv  # once per key/value layer for the whole loop, not once per step
    assert len(seen) == 3
    for x, out in seen:
        plain = torch.nn.functional.linear(x, lin.weight, lin.bias)
        assert x.shape[0] == 4 and torch.equal(out[:2], plain[:2])  # [unconditional; conditional]: none first
        changed = (out != plain).any(-1)  # (4, T)
        assert changed[2].nonzero().flatten().tolist() == [4]  # "a photo of <c-kv>": the concept's token only
        assert not changed[3].any()


@pytest.fixture(scope="module")
def images(tiny_base, experts, tmp_path_factory):
    """One batch of prompts from the base model (the experts' tokens only), lookup and lookup+span."""
    chosen = [experts["kv"], experts["no-kv"], experts["two"]]
    prompts = [
        "a photo of a ball",
        "a photo of <c-kv> ball",
        "a photo of <c-nokv> ball",
        "a photo of <c-two-a> <c-two-b> ball",
    ]
    seeds = [0, 1, 2, 3]
    tmp = tmp_path_factory.mktemp("span-methods")
    out = {}
    for name in ("lookup", "lookup+span"):
        ctx = MethodContext(base=str(tiny_base), learn=None, workdir=tmp / name, store=tmp / "store", device="cpu")
        method = METHODS[name](ctx)
        method.experts = lambda: chosen  # experts made by hand, not learned
        out[name] = method.sampler()(prompts, seeds, steps=3)
    out["base"] = Sampler(method.base_pipeline(chosen))(prompts, seeds, steps=3)
    return {k: [np.asarray(im, dtype=np.int16) for im in v] for k, v in out.items()}


def test_lookup_span_on_a_prompt_naming_no_concept_is_the_base_model(images):
    assert np.array_equal(images["lookup+span"][0], images["base"][0])
    assert np.array_equal(images["lookup"][0], images["base"][0])


def test_lookup_span_differs_from_lookup_only_through_keys_and_values(images):
    span, lookup, base = images["lookup+span"], images["lookup"], images["base"]
    # <c-kv> adapts only attn2 to_k / to_v: lookup changes every token's keys and values, lookup+span its own only
    assert np.abs(span[1] - lookup[1]).max() > 8
    assert np.abs(span[1] - base[1]).max() > 0  # one token of 77: a small move in the tiny random model
    # <c-nokv> adapts no attn2 key or value: the two methods are the same update
    assert np.array_equal(span[2], lookup[2]) and np.abs(span[2] - base[2]).max() > 8
    # a two-token concept adapting every layer: lookup+span differs from lookup and from the base
    assert np.abs(span[3] - lookup[3]).max() > 8 and np.abs(span[3] - base[3]).max() > 8


def test_lookup_span_is_a_method_beside_lookup():
    assert METHODS["lookup+span"].name == "lookup+span" and "lookup" in METHODS


def test_fl2t_pipeline_with_span_gives_the_named_experts_key_value_update_to_their_own_tokens(consolidated_library):
    from fl2t.consolidate.pipeline import FL2TPipeline

    pipe = FL2TPipeline.from_pretrained(library=consolidated_library, span=True)
    stack, G, r = pipe.aggregated.stack, len(pipe.experts), pipe.aggregated.stack.rank
    g, prompt = pipe.concept_names.index("c-stripes"), "a photo of <c-stripes> ball"
    m = next(m for m in stack.modules if is_key_value(m))
    alpha, gamma = pipe.weights_for(prompt)
    layer = stack.modules.index(m)
    w = alpha[layer, g] * (torch.ones(r) if gamma is None else gamma[layer, g])
    a, b = stack.A[m].view(G, r, -1)[g], stack.B[m].view(G, r, -1)[g]
    span = pipe.span

    def run(text: str, restricted: bool):
        pipe.span = span if restricted else None
        call = dict(num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))
        try:
            seen = _recorded(pipe.unet, [m], lambda: pipe(text, **call))
        finally:
            pipe.span = span
        return seen[m]

    (x, spanned), (x_fused, fused) = run(prompt, True), run(prompt, False)
    assert torch.equal(x, x_fused)
    delta = ((x @ a.T) * w) @ b  # (2, T, out): the named expert's update, fused into every token without span
    own = span.spans(prompt_ids(pipe.tokenizer, [prompt]))[0, g]  # (T,)
    expected = fused - delta
    expected[1, own] = fused[1, own]  # the conditional half keeps it on the concept's token
    assert delta.abs().amax() > 100 * 2e-6  # the learned experts' update is small: compared at float precision
    torch.testing.assert_close(spanned, expected, rtol=1e-6, atol=2e-6)
    (_, spanned), (_, fused) = run("a photo of a ball", True), run("a photo of a ball", False)
    assert torch.equal(spanned, fused)  # naming no concept: the fused update alone
