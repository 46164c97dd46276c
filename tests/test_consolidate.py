"""Step 2: the set-invariant decoder, fused inference, order-agnostic libraries, the CLI around them."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import STEP2
from fl2t.config import ConsolidateSettings
from fl2t.consolidate import ConsolidatedConfig, ConsolidatedModel, consolidate
from fl2t.consolidate.common import canonical
from fl2t.consolidate.pipeline import FL2TPipeline
from fl2t.consolidate.train import _route_prompts
from fl2t.errors import Cancelled, Fl2tError
from fl2t.fusion import AggregatedLoRA, stack_experts
from fl2t.library import Library
from fl2t.models import load_base
from fl2t.pipeline import ExpertPipeline
from test_cli import run


def new_model(proxies: torch.Tensor, shapes: dict, rank: int, settings: ConsolidateSettings) -> ConsolidatedModel:
    G, d = proxies.shape
    config = ConsolidatedConfig(settings=settings, n_concepts=G, width=d, rank=rank, layer_shapes=shapes)
    return ConsolidatedModel(config, proxies)


def saved_config(lib) -> dict:
    return json.loads((lib / "consolidated" / "config.json").read_text())


@pytest.mark.parametrize("proxy_attention", [True, False])
def test_permuting_the_concepts_permutes_the_decoder_outputs(proxy_attention):
    torch.manual_seed(0)
    G, d, L, r = 5, 32, 7, 4
    settings = ConsolidateSettings(relevance="learned", proxy_attention=proxy_attention, gates=True)
    model = new_model(torch.randn(G, d), {f"layer{i}": (16, 16) for i in range(L)}, r, settings)
    with torch.no_grad():
        model.relevance.weight.normal_()
        model.gate.weight.normal_()
    text, pad = torch.randn(3, 9, d), torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 6:] = True
    named = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0.5, 0, 1, 0]])
    alpha, gamma, z = model(text, pad, named)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        model.proxies.copy_(model.proxies[perm])
    alpha_p, gamma_p, z_p = model(text, pad, named[:, perm])
    assert torch.allclose(z_p, z[:, perm], atol=1e-6)
    assert torch.allclose(alpha_p, alpha[:, :, perm], atol=1e-6)
    assert torch.allclose(gamma_p, gamma[:, :, perm], atol=1e-6)
    assert alpha.shape == (3, L, G) and gamma.shape == (3, L, G, r) and ((alpha >= 0) & (alpha <= 1)).all()


def test_ablation_switches_remove_their_component():
    proxies, shapes = torch.randn(3, 32), {"a.to_q": (16, 16)}
    on = ConsolidateSettings(relevance="learned", gates=True, shared=True, contrastive=True, proxy_attention=True)
    full = new_model(proxies, shapes, 4, on)
    off = ConsolidateSettings(gates=False, shared=False, contrastive=False, proxy_attention=False)
    bare = new_model(proxies, shapes, 4, off)
    assert {"gate.weight", "shared_A.a__to_q", "prompt_proj.weight", "layers.0.self_attn.in_proj_weight"} <= set(
        full.state_dict()
    )
    assert not any(k.startswith(("gate", "shared", "prompt_proj")) or "self_attn" in k for k in bare.state_dict())
    alpha, gamma, _ = bare(torch.randn(2, 5, 32), torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 3))
    assert gamma is None and bare.shared_factors() is None


def test_fused_update_equals_per_sample_hooks_and_unfuse_restores_exact_weights(four_experts, tiny_base):
    base = load_base(str(tiny_base))
    unet = base.unet
    stack = stack_experts(four_experts, unet)
    agg = AggregatedLoRA(unet, stack)
    L, G, r = len(stack.modules), stack.n_experts, stack.rank
    g = torch.Generator().manual_seed(0)
    alpha = torch.softmax(torch.randn(L, G + 1, generator=g), -1)[:, :G]
    gamma = torch.rand(L, G, r, generator=g)
    x, t, states = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad():
        agg.set(alpha.expand(2, L, G), gamma.expand(2, L, G, r))
        hooked = unet(x, t, states).sample
        agg.fuse(alpha, gamma)
        fused = unet(x, t, states).sample
        agg.unfuse()
        plain = unet(x, t, states).sample
    assert torch.allclose(fused, hooked, atol=1e-5)
    assert (fused - plain).abs().max() > 1e-4
    assert all(torch.equal(before[n], p) for n, p in unet.named_parameters())


def test_one_hot_weights_reproduce_the_expert_alone(four_experts, tmp_path):
    """The aggregation algebra agrees with peft: alpha one-hot on g, gamma 1 == expert g's LoRA."""
    lib = Library(tmp_path / "lib")
    lib.add(four_experts[2])
    alone = ExpertPipeline.from_library(lib, four_experts[2].name)
    base = load_base(lib.base["id"])
    agg = AggregatedLoRA(base.unet, stack_experts(four_experts, base.unet))
    onehot = torch.zeros(1, len(agg.stack.modules), 4)
    onehot[..., 2] = 1
    g = torch.Generator().manual_seed(1)
    x, t, states = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        agg.set(onehot)
        ours = base.unet(x, t, states).sample
        theirs = alone.unet(x, t, states).sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_consolidated_library_generates_and_explains_its_choice(consolidated_library):
    lib = Library(consolidated_library)
    config = saved_config(consolidated_library)
    assert [e["name"] for e in config["concepts"]] == [
        e.name for e in sorted(lib.experts(), key=lambda e: e.content_hash)
    ]
    pipe = FL2TPipeline.from_pretrained(library=consolidated_library)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    prompts = ["a photo of <c-stripes> ball", "a photo of <c-checks> box", "a photo of <c-stripes> ball"]
    out = pipe(
        prompts,
        num_inference_steps=2,
        num_images_per_prompt=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (6, 32, 32, 3)
    assert all(torch.equal(before[n], p) for n, p in pipe.unet.named_parameters())
    rel = pipe.relevance("a photo of <c-stripes> ball")
    assert len(rel) == len(pipe.aggregated.stack.modules)
    none = [(1 - w["c-stripes"]) * (1 - w["c-checks"]) for w in rel.values()]
    assert all(set(w) == {"c-stripes", "c-checks", "none"} for w in rel.values())
    assert all(abs(w["none"] - n) < 1e-5 for w, n in zip(rel.values(), none))


@pytest.mark.parametrize(
    "relevance, pair_share",
    [
        ("lookup", 0.0),  # the default: nothing trained, the saved model's initial weights drawn from the set's seed
        ("learned", 0.0),
        (
            "learned",
            0.25,
        ),  # pair training: the pair anchors' teacher draws its scheduler's noise from the pair's generator
    ],
)
def test_library_is_the_same_whatever_the_arrival_order(tmp_path, four_experts, relevance, pair_share):
    orders = [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]]
    blobs, images = [], []
    for k, order in enumerate(orders):
        lib = Library(tmp_path / f"lib{k}")
        for i in order:  # incremental: consolidate after each arrival
            lib.add(four_experts[i])
            steps = 2 if len(lib.names()) < 4 else 6
            settings = STEP2.model_copy(update={"steps": steps, "pair_share": pair_share, "relevance": relevance})
            lib.save_consolidated(consolidate(lib, settings).save_pretrained)
        folder = lib.path / "consolidated"
        blobs.append([p.read_bytes() for p in sorted(folder.glob("*.safetensors"))])
        pipe = FL2TPipeline.from_pretrained(library=lib)
        images.append(
            pipe(
                "a photo of <c-rings> ring",
                num_inference_steps=2,
                output_type="np",
                generator=torch.Generator().manual_seed(4),
            ).images
        )
    assert blobs[0] == blobs[1] == blobs[2]
    assert (images[0] == images[1]).all() and (images[0] == images[2]).all()


def test_stale_consolidation_is_reported(tmp_path, consolidated_library, four_experts):
    shutil.copytree(consolidated_library, tmp_path / "lib")
    lib = Library(tmp_path / "lib")
    lib.add(four_experts[3])
    with pytest.raises(Fl2tError, match="run `fl2t consolidate"):
        FL2TPipeline.from_pretrained(library=lib)


def test_cli_consolidate_generate_inspect_forget(tmp_path, consolidated_library, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(consolidated_library, lib)
    code, out, err = run(["consolidate", "-l", lib, "--learned", "--steps", "3", "--no-gates", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["set_hash"] == saved_config(lib)["set_hash"]
    code, out, err = run(["inspect", "a photo of <c-stripes> ball", "-l", lib, "--json"], capsys)
    assert code == 0 and all("c-stripes" in w for w in json.loads(out).values())
    (tmp_path / "s.yaml").write_text("consolidate:\n  steps: 2\n")
    code, out, err = run(["forget", "c-checks", "-l", lib, "--config", tmp_path / "s.yaml"], capsys)
    assert code == 0, err
    assert Library(lib).names() == ["c-stripes"]
    assert [e["name"] for e in saved_config(lib)["concepts"]] == ["c-stripes"]


def test_a_two_concept_prompt_generates_with_both_concepts(tmp_path, consolidated_library, capsys):
    """`fl2t generate` with a prompt naming two concepts, against the same prompt and seed made otherwise: the image
    is not the base model's, nor either concept's expert alone, and it is far closer to both experts at full weight
    (what naming both asks for) than to either alone. A weaker check than CLIP alignment with each concept's
    references, which was tried and not used: these experts (four steps on a random base) are not recognisable, and
    on the tiny world at a test's Step-1 budget (40-60 steps) CLIP told a named concept from an unnamed one for some
    concepts only, and the wrong way round for checkdiamond and pastel. Here the concepts act through their tokens
    and experts: dropping either changes the image by several grey levels."""
    prompt, seed = "a photo of <c-stripes> ball and <c-checks> box", 3

    def generated(name: str, *concepts: str) -> np.ndarray:
        args = ["generate", prompt, "-l", consolidated_library, "--steps", "3", "--seed", seed]
        code, _, err = run([*args, *[x for c in concepts for x in ("--concept", c)], "-o", tmp_path / name], capsys)
        assert code == 0, err
        return np.asarray(Image.open(tmp_path / name), dtype=float)

    both = generated("fl2t.png")  # the consolidated library
    stripes, checks = generated("stripes.png", "c-stripes"), generated("checks.png", "c-checks")
    lookup = generated("lookup.png", "c-stripes", "c-checks")  # both experts alone, at full weight
    pipe, _ = ExpertPipeline.for_library(consolidated_library)  # the library's base model, no concept
    base = pipe(prompt, num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(seed))
    base = np.asarray(base.images[0], dtype=float)

    def far(a: np.ndarray, b: np.ndarray) -> float:  # mean absolute difference, grey levels
        return float(np.abs(a - b).mean())

    assert min(far(both, base), far(both, stripes), far(both, checks)) > 2.0
    assert far(both, lookup) < 0.25 * min(far(both, stripes), far(both, checks))


@pytest.fixture(scope="module")
def routed(tmp_path_factory, four_experts) -> FL2TPipeline:
    """The four experts consolidated with the default routing terms on (40 Step-2 steps), loaded for generation."""
    lib = Library(tmp_path_factory.mktemp("routed") / "lib")
    for e in four_experts:
        lib.add(e)
    lib.save_consolidated(consolidate(lib, STEP2.model_copy(update={"steps": 40})).save_pretrained)
    return FL2TPipeline.from_pretrained(library=lib)


def selection(pipe: FL2TPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, G): the mean weight over layers each concept's own prompt gives every concept; (G,): a prompt naming
    none's."""
    alpha = torch.stack([pipe.weights_for(e.spec.stable_prompt)[0].mean(0) for e in pipe.experts])
    return alpha, pipe.weights_for("a photo of a ball")[0].mean(0)


def selects_its_own(alpha: torch.Tensor, base: torch.Tensor) -> bool:
    """Each concept's prompt gives its own concept the highest weight, a clear one (over 1/2), and the prompt
    naming none gives most of its weight to none of them."""
    own = bool((alpha.argmax(1) == torch.arange(len(alpha))).all()) and alpha.diagonal().min() > 0.5
    return own and 1 - base.sum() > 0.5


def test_each_prompt_selects_its_own_concept(routed):
    alpha, base = selection(routed)
    assert selects_its_own(alpha, base), (alpha, base)


def test_a_pair_prompt_gives_both_concepts_their_single_prompt_weight(routed):
    """Each concept's weight is its own decision: naming two concepts gives each at least 0.9 of what naming it alone
    gives, on every layer (a softmax over the concepts gave each about half)."""
    alone = {e.name: routed.weights_for(e.spec.stable_prompt)[0] for e in routed.experts}
    a, b = routed.experts[:2]
    both = routed.weights_for(f"a photo of {a.spec.subject} and {b.spec.subject}")[0]
    for g, e in enumerate(routed.experts[:2]):
        assert (both[:, g] >= 0.9 * alone[e.name][:, g]).all(), (both[:, g], alone[e.name][:, g])
        assert alone[e.name][:, g].min() > 0.9


def test_the_heads_are_taught_concepts_named_beside_other_concepts_class_words(four_experts):
    """Prompts naming none hold class words, which teaches the heads that a class word means "none"; so half of a
    concept's own routing prompts hold another concept's class word besides (without them the world's styles, named
    with an object's noun as in "a red circle in the style of <s-pastel>", ran at about half strength)."""
    experts = canonical(four_experts)
    items = _route_prompts(experts, [], torch.Generator().manual_seed(0))
    for g, e in enumerate(experts):
        own = [p.split() for p, names in items if names == (g,)]
        others = {x.spec.class_word for x in experts if x is not e}
        beside = sum(bool(others & set(words)) for words in own)
        assert all(e.spec.subject.split()[0] in words for words in own)
        assert 0.3 * len(own) <= beside <= 0.7 * len(own), (e.name, beside, len(own))


def test_the_selection_is_the_trained_heads(routed):
    """The relevance heads carry the selection: with their trained weights replaced by random ones (the token feature's
    weight included), the prompts no longer select their own concepts."""
    model = routed.consolidated
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for p in (model.relevance.weight, model.relevance.bias, model.token_weight, model.none_logit):
                p.copy_(torch.randn(p.shape, generator=g))
        broken = selection(routed)
    finally:
        model.load_state_dict(trained)
    assert selects_its_own(*selection(routed))
    assert not selects_its_own(*broken), broken


def test_saved_model_loads_back_with_its_config_weights_and_outputs(tmp_path):
    torch.manual_seed(0)
    shapes = {"down.attn2.to_k": (32, 16), "up.attn1.to_q": (16, 16)}
    model = new_model(
        torch.randn(3, 32), shapes, 4, ConsolidateSettings(relevance="learned", decoder_layers=1, gates=True)
    )
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = ConsolidatedModel.from_pretrained(tmp_path / "m")
    assert again.config == model.config and list(again.config.layer_shapes) == list(shapes)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    text, pad, named = (
        torch.randn(2, 5, 32),
        torch.zeros(2, 5, dtype=torch.bool),
        torch.tensor([[1.0, 0, 0], [0, 0, 0]]),
    )
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(text, pad, named), again(text, pad, named)))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_changed_consolidated_file_is_refused_on_load(name, tmp_path, consolidated_library):
    shutil.copytree(consolidated_library, tmp_path / "lib")
    path = tmp_path / "lib" / "consolidated" / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(Fl2tError, match="consolidated model is damaged"):
        FL2TPipeline.from_pretrained(library=tmp_path / "lib")


def test_cancel_stops_consolidation_after_k_steps_and_writes_nothing(tmp_path, consolidated_library):
    shutil.copytree(consolidated_library, tmp_path / "lib")
    lib = Library(tmp_path / "lib")
    before = {p.name: p.read_bytes() for p in (tmp_path / "lib" / "consolidated").iterdir()}
    steps: list[int] = []
    with pytest.raises(Cancelled, match="cancelled at step 2"):
        consolidate(lib, STEP2, on_step=lambda i, loss: steps.append(i), cancel=lambda: len(steps) >= 2)
    assert steps == [0, 1]
    assert {p.name: p.read_bytes() for p in (tmp_path / "lib" / "consolidated").iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == [
        ".lock",
        "consolidated",
        "experts",
        "history",
        "library.json",
    ]


def test_the_default_consolidation_is_the_token_lookup_and_trains_nothing(tmp_path, four_experts, capsys):
    """`relevance: lookup` (the default): no step is trained and no anchor is read; every layer gives each concept
    whose tokens the prompt contains the weight 1 and every other 0, for one concept, for two, and for none."""
    lib = Library(tmp_path / "lib")
    for e in four_experts[:3]:
        lib.add(e)
    steps = []
    model = consolidate(lib, ConsolidateSettings(), on_step=lambda i, loss: steps.append(i))
    assert steps == [] and model.config.settings.relevance == "lookup"
    lib.save_consolidated(model.save_pretrained)
    pipe = FL2TPipeline.from_pretrained(library=lib)
    names = pipe.concept_names
    L = len(pipe.aggregated.stack.modules)
    for prompt, named in [
        ("a photo of <c-stripes> ball", {"c-stripes"}),
        ("a photo of <c-checks> box beside <c-rings> ring", {"c-checks", "c-rings"}),
        ("a photo of a ball", set()),
    ]:
        alpha, gamma = pipe.weights_for(prompt)
        want = torch.tensor([float(n in named) for n in names]).expand(L, -1)
        assert gamma is None and torch.equal(alpha, want), prompt
    code, out, err = run(["inspect", "a photo of <c-stripes> ball", "-l", lib.path, "--json"], capsys)
    assert code == 0 and all(w["c-stripes"] == 1.0 and w["none"] == 0.0 for w in json.loads(out).values())


def test_a_model_saved_before_the_lookup_existed_loads_as_learned(tmp_path, consolidated_library):
    shutil.copytree(consolidated_library, tmp_path / "lib")
    path = tmp_path / "lib" / "consolidated" / "config.json"
    config = json.loads(path.read_text())
    assert config["settings"].pop("relevance") == "learned"
    assert ConsolidatedConfig.model_validate(config).settings.relevance == "learned"


def test_a_learned_step2_part_asked_of_the_lookup_is_refused_with_one_message(tmp_path, consolidated_library, capsys):
    with pytest.raises(ValueError, match="gates belong"):
        ConsolidateSettings(gates=True)
    shutil.copytree(consolidated_library, tmp_path / "lib")
    before = (tmp_path / "lib" / "consolidated" / "config.json").read_bytes()
    code, out, err = run(["consolidate", "-l", tmp_path / "lib", "--gates"], capsys)
    assert code != 0 and "gates belong(s) to the learned Step 2" in err and "--learned" in err
    code, out, err = run(["consolidate", "-l", tmp_path / "lib", "--steps", "5"], capsys)
    assert code != 0 and "--steps: the token lookup trains nothing; add --learned" in err
    assert (tmp_path / "lib" / "consolidated" / "config.json").read_bytes() == before
    code, out, err = run(["consolidate", "-l", tmp_path / "lib", "--learned", "--gates", "--steps", "2"], capsys)
    assert code == 0, err
    assert saved_config(tmp_path / "lib")["settings"]["gates"] is True
