import json

import pytest
import torch

from conftest import FAST
from fl2t.config import LearnSettings
from fl2t.data import load_concept
from fl2t.errors import Cancelled, Fl2tError
from fl2t.experts import learn_expert
from fl2t.library import Library
from fl2t.models import load_base, sd15_random_pipeline
from fl2t.pipeline import ExpertPipeline
from fl2t.text import class_word_embedding


@torch.no_grad()
def _eps(pipe, prompt: str) -> torch.Tensor:
    """The UNet's noise prediction for fixed noisy latents and a timestep, conditioned on `prompt`."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    states, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return pipe.unet(latents, torch.tensor([500]), states).sample


def test_expert_changes_its_token_prompts_and_barely_others(learned_library, tiny_base):
    base = load_base(str(tiny_base))
    pipe = ExpertPipeline.from_library(learned_library, "c-stripeball")
    with_token = "a photo of <c-stripeball> ball"
    without = "a photo of a red circle"
    moved = (_eps(pipe, with_token) - _eps(base, with_token)).abs().mean()
    kept = (_eps(pipe, without) - _eps(base, without)).abs().mean()
    assert moved > 0.01
    assert kept < 0.1 * moved, (kept, moved)


def test_training_moves_lora_and_embedding_from_init(learned_library):
    expert = Library(learned_library).expert("c-stripeball")
    b = [v for k, v in expert.lora.items() if k.endswith("lora_B.weight")]
    assert len(b) == 112 // 2 and all(v.abs().max() > 0 for v in b)  # B starts at zero
    assert expert.token_embeddings.shape == (1, 32) and expert.stable_embedding.shape == (32,)
    assert expert.anchors.shape == (2, 4, 16, 16) and len(expert.anchor_prompts) == 2


def test_library_round_trips_exactly(tmp_path, learned_library):
    lib = Library(learned_library)
    expert = lib.expert("c-stripeball")
    other = Library(tmp_path / "copy")
    other.add(expert)
    again = other.expert("c-stripeball")
    for k in expert.lora:
        assert torch.equal(expert.lora[k], again.lora[k])
    assert torch.equal(expert.token_embeddings, again.token_embeddings)
    assert torch.equal(expert.anchors, again.anchors)
    assert (
        again.content_hash
        == expert.content_hash
        == json.loads((learned_library / "library.json").read_text())["experts"]["c-stripeball"]
    )
    for f in ("lora.safetensors", "embeddings.safetensors", "anchors.safetensors", "expert.json"):
        assert (tmp_path / "copy" / "experts" / "c-stripeball" / f).read_bytes() == (
            learned_library / "experts" / "c-stripeball" / f
        ).read_bytes()


def test_changed_weights_are_detected_on_load(library_copy):
    path = library_copy / "experts" / "c-stripeball" / "lora.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Fl2tError, match="does not match its recorded hash"):
        Library(library_copy).expert("c-stripeball")


def test_duplicate_name_or_token_is_refused_unless_replace(library_copy, learned_library):
    lib = Library(library_copy)
    expert = lib.expert("c-stripeball")
    with pytest.raises(Fl2tError, match="pass --replace"):
        lib.add(expert)
    renamed = type(expert)(**{**expert.__dict__, "spec": expert.spec.model_copy(update={"name": "other"})})
    with pytest.raises(Fl2tError, match="belongs to concept 'c-stripeball'"):
        lib.add(renamed)
    lib.add(expert, replace=True)
    assert lib.names() == ["c-stripeball"] and not list(library_copy.glob(".tmp-*"))


def test_layerwise_expert_learns_one_embedding_per_cross_attention_layer(tmp_path, tiny_base, concepts_root):
    settings = FAST.model_copy(update={"layerwise": True, "steps": 4})
    expert = learn_expert(load_concept(concepts_root / "c-checkbox"), str(tiny_base), settings)
    n_cross = sum(1 for k in load_base(str(tiny_base)).unet.attn_processors if "attn2" in k)
    assert expert.token_embeddings.shape == (n_cross, 1, 32)
    # layers are trained apart: their embeddings differ after training from the same init
    assert (expert.token_embeddings[0] - expert.token_embeddings[-1]).abs().max() > 0
    lib = Library(tmp_path / "lib")
    lib.add(expert)
    pipe = ExpertPipeline.from_library(lib, "c-checkbox")
    out = pipe(
        "a photo of <c-checkbox> box",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(out.images)).all()


def test_learning_is_deterministic_for_a_seed(tiny_base, concepts_root, learned_library):
    settings = FAST.model_copy(update={"num_anchors": 0})
    again = learn_expert(load_concept(concepts_root / "c-stripeball"), str(tiny_base), settings)
    assert again.content_hash == Library(learned_library).expert("c-stripeball").content_hash


def test_token_that_is_a_word_is_refused(tiny_base, concepts_root):
    concept = load_concept(concepts_root / "c-stripeball", tokens=["ball"])
    with pytest.raises(Fl2tError, match="already a word of the tokenizer"):
        learn_expert(concept, str(tiny_base), FAST)


def test_a_lora_target_that_matches_no_attention_layer_is_refused_not_ignored(tiny_base, concepts_root):
    settings = FAST.model_copy(update={"lora_targets": ["to_q", "conv1"]})  # conv1 is a ResNet layer
    with pytest.raises(Fl2tError, match="'conv1' matches no UNet layer"):
        learn_expert(load_concept(concepts_root / "c-stripeball"), str(tiny_base), settings)


def test_sd15_architecture_runs_a_training_step_at_64px(concepts_root):
    pipe = sd15_random_pipeline(seed=0)
    assert sum(p.numel() for p in pipe.unet.parameters()) > 850e6
    settings = LearnSettings(steps=1, resolution=64, lora_attention="cross", num_anchors=1, anchor_steps=1)
    expert = learn_expert(load_concept(concepts_root / "c-stripeball"), pipe, settings)
    assert len(expert.modules) == 64  # 16 cross-attention layers x (q, k, v, out), as in CIDM
    assert expert.token_embeddings.shape == (1, 768)
    assert expert.anchors.shape == (1, 4, 8, 8)
    assert any(v.abs().max() > 0 for k, v in expert.lora.items() if k.endswith("lora_B.weight"))


@pytest.mark.parametrize("option", [{"gradient_checkpointing": True}, {"mixed_precision": "bf16"}])
def test_memory_options_train_the_same_expert(option, tiny_base, concepts_root):
    settings = FAST.model_copy(update={"steps": 3, "num_anchors": 0})
    concept = load_concept(concepts_root / "c-stripeball")
    plain = learn_expert(concept, str(tiny_base), settings)
    other = learn_expert(concept, str(tiny_base), settings.model_copy(update=option))  # bf16 after full precision
    tol = 1e-5 if "gradient_checkpointing" in option else 5e-2  # bf16 rounds the frozen weights
    delta = max((plain.lora[k] - other.lora[k]).abs().max().item() for k in plain.lora)
    assert delta <= tol * max(v.abs().max().item() for v in plain.lora.values())
    assert any(v.abs().max() > 0 for k, v in other.lora.items() if k.endswith("lora_B.weight"))


def test_cancel_stops_learning_after_k_steps(tiny_base, concepts_root):
    steps: list[int] = []
    with pytest.raises(Cancelled, match="cancelled at step 3"):
        learn_expert(
            load_concept(concepts_root / "c-checkbox"),
            str(tiny_base),
            FAST.model_copy(update={"steps": 6}),
            on_step=lambda i, loss: steps.append(i),
            cancel=lambda: len(steps) >= 3,
        )
    assert steps == [0, 1, 2]


def test_token_embeddings_stop_training_at_the_norm_limit(tiny_base, concepts_root):
    """ED-LoRA's rule (Mix-of-Show, CIDM): once the concept tokens' mean norm reaches the limit they stay as they
    are and only the LoRA learns on."""
    concept = load_concept(concepts_root / "c-stripeball")
    settings = FAST.model_copy(update={"steps": 6, "num_anchors": 0})
    free = learn_expert(concept, str(tiny_base), settings)
    start = class_word_embedding(*_tokenizer_and_encoder(tiny_base), concept.spec.class_word)
    moved = free.token_embeddings.norm(dim=-1).mean().item()
    assert abs(moved - start.norm().item()) > 1e-3  # free rows change their norm
    limit = start.norm().item()  # reached before the first step: the rows never move
    capped = learn_expert(concept, str(tiny_base), settings.model_copy(update={"embedding_norm_limit": limit}))
    assert torch.allclose(capped.token_embeddings, start.expand_as(capped.token_embeddings))
    assert any(v.abs().max() > 0 for k, v in capped.lora.items() if k.endswith("lora_B.weight"))  # the LoRA learned
    assert moved > start.norm().item()  # at this learning rate the rows grow
    between = (start.norm().item() + moved) / 2  # reached mid-way: the rows stop just past it, not where free ones end
    mid = learn_expert(concept, str(tiny_base), settings.model_copy(update={"embedding_norm_limit": between}))
    assert mid.token_embeddings.norm(dim=-1).mean().item() >= between
    assert not torch.allclose(mid.token_embeddings, free.token_embeddings)


def _tokenizer_and_encoder(folder):
    pipe = load_base(str(folder))
    return pipe.tokenizer, pipe.text_encoder
