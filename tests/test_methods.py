"""What makes each continual baseline what its paper says: EWC's Fisher and penalty, LwF's on-the-fly teacher,
C-LoRA's training on top of the earlier LoRAs and its penalty, MagMax's merge of sequential task vectors.

Hand-made tensors and toy peft layers where the mechanism allows; a few two-task runs of 2 steps on the tests'
tiny random base (tests/conftest.py) where the mechanism is the wiring into Step 1."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from conftest import FAST
from fl2t.data import load_concept
from fl2t.expert import Expert
from fl2t.experts import Regulariser, learn_expert
from fl2t.methods import METHODS
from fl2t.methods.base import AloneMethod, MethodContext, dense_update, lora_layers
from fl2t.methods.clora import _CLoRA
from fl2t.methods.ewc import _EWC, EWCSettings, diagonal_fisher
from fl2t.methods.lwf import _LwF
from fl2t.methods.magmax import MagMax, magmax_pipeline, magmax_update
from fl2t.methods.sequential import Sequential

TWO_STEPS = FAST.model_copy(update={"steps": 2, "lr": 1e-3, "num_anchors": 2, "anchor_steps": 2})


def _expert(lora: dict[str, torch.Tensor], anchors=None, prompts=()) -> Expert:
    return Expert(
        spec=None,
        lora=lora,
        token_embeddings=None,
        stable_embedding=None,
        anchors=anchors,
        anchor_prompts=list(prompts),
        base={},
        settings={},
    )


class _Toy(nn.Module):
    """A stand-in for `ExpertModel`: `unet` holds one real peft LoRA layer ("proj", 4 -> 4, rank 2); the
    "noise prediction" is that layer applied to the noisy input."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        net = nn.Sequential(OrderedDict(proj=nn.Linear(4, 4)))
        self.unet = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), net)
        for n, p in self.unet.named_parameters():
            p.requires_grad_("lora_" in n)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy)

    def lora(self) -> dict[str, torch.Tensor]:
        a, b = lora_layers(self.unet)["proj"]
        return {"proj.lora_A.weight": a.detach().clone(), "proj.lora_B.weight": b.detach().clone()}


def _ctx(tmp_path, tiny_base, settings=None) -> MethodContext:
    return MethodContext(
        base=str(tiny_base), learn=TWO_STEPS, workdir=tmp_path / "m", store=tmp_path / "store", settings=settings
    )


def _concepts(concepts_root):
    return [load_concept(concepts_root / n) for n in ("c-stripeball", "c-checkbox")]


def _record_inits(monkeypatch) -> list:
    """The `init_lora` each Step-1 run of the sequential family starts from, in order."""
    import fl2t.methods.sequential as sequential

    inits, real = [], sequential.learn_expert

    def learn(*args, **kwargs):
        inits.append(kwargs["init_lora"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential, "learn_expert", learn)
    return inits


# -- EWC ----------------------------------------------------------------------------------------------------------
def test_the_fisher_is_the_mean_squared_gradient_of_the_data_loss():
    w = nn.Parameter(torch.tensor([0.5, -1.0]))

    def data_loss(gen):
        x = torch.randn(2, generator=gen)
        return (w @ x - 1.0) ** 2

    got = diagonal_fisher({"w": w}, data_loss, samples=5, seed=3)
    gen = torch.Generator().manual_seed(3)
    by_hand = torch.zeros(2)
    for _ in range(5):
        x = torch.randn(2, generator=gen)
        by_hand += (2 * (w.detach() @ x - 1.0) * x) ** 2  # d/dw (w·x − 1)² = 2 (w·x − 1) x
    assert torch.allclose(got["w"], by_hand / 5)
    assert w.grad is None  # the training's gradients are not touched


def test_the_ewc_fisher_ignores_the_penalty_and_its_gradient_pulls_towards_the_previous_lora():
    model = _Toy()
    lora = model.lora()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=gen)

    def data_loss(batch, g):
        i = torch.randint(len(x), (batch,), generator=g)
        return model(x[i], None, None).pow(2).mean()

    anchor = {k: v + 1.0 for k, v in lora.items()}  # θ* one away from θ in every entry
    fisher = {k: torch.rand(v.shape, generator=gen) + 0.5 for k, v in lora.items()}
    with_penalty = _EWC(fisher, anchor, lam=1e3, samples=4, seed=1)
    without = _EWC({}, {}, lam=0.0, samples=4, seed=1)
    for reg in (with_penalty, without):
        reg.start(model, None)
        reg.end(model, data_loss)
    assert with_penalty.loss(model, None, None).item() > 1e3  # the penalty is there, and large
    for k in lora:
        assert torch.equal(with_penalty.task_fisher[k], without.task_fisher[k])
        assert with_penalty.task_fisher[k].abs().sum() > 0

    # ∇ λ Σ F (θ − θ*)² = 2 λ F (θ − θ*): a gradient step moves every entry towards θ*
    with_penalty.loss(model, None, None).backward()
    params = {f"proj.lora_{x}.weight": p for x, p in zip("AB", lora_layers(model.unet)["proj"], strict=True)}
    for k, p in params.items():
        assert torch.allclose(p.grad, 2 * 1e3 * fisher[k] * (p.detach() - anchor[k]))
        stepped = p.detach() - 1e-5 * p.grad
        assert ((stepped - anchor[k]).abs() < (p.detach() - anchor[k]).abs()).all()


def test_step1_gives_the_regulariser_the_final_weights_and_the_data_loss_alone(tiny_base, concepts_root):
    class Probe(Regulariser):
        def loss(self, model, tokenize, gen):
            return torch.tensor(1e3)  # a large term the data loss must not contain

        def end(self, model, data_loss):
            self.lora = {k: v.detach().clone() for k, v in model.unet.state_dict().items() if "lora_" in k}
            self.value = data_loss(1, torch.Generator().manual_seed(0)).item()

    probe, losses = Probe(), []
    concept = _concepts(concepts_root)[0]
    expert = learn_expert(concept, str(tiny_base), TWO_STEPS, regulariser=probe, on_step=lambda s, v: losses.append(v))
    assert min(losses) > 1e3 and probe.value < 10.0  # training saw the term; the end's data loss does not
    for k, v in expert.lora.items():  # at the final weights
        key = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(probe.lora[key], v)


def test_ewc_stores_a_fisher_per_task_and_anchors_its_penalty_at_the_previous_lora(
    tmp_path, tiny_base, concepts_root, monkeypatch
):
    method = METHODS["ewc"](_ctx(tmp_path, tiny_base, EWCSettings(ewc_lambda=1e6, fisher_samples=2)))
    penalties, real = [], _EWC.loss

    def recorded(self, *args):
        value = real(self, *args)
        penalties.append(value.item())
        return value

    monkeypatch.setattr(_EWC, "loss", recorded)
    first, second = _concepts(concepts_root)
    method.learn(first)
    assert penalties == [0.0, 0.0]  # task 1: no earlier task, no penalty
    fisher = method.regulariser(method.experts(), None).fisher
    assert set(fisher) == set(method.experts()[0].lora) and all((f >= 0).all() for f in fisher.values())
    assert sum(f.sum() for f in fisher.values()) > 0
    penalties.clear()
    method.learn(second)
    # θ* is task 1's LoRA, where task 2 starts: zero penalty at the first step, then the LoRA has moved
    assert penalties[0] == 0.0 and penalties[1] > 0.0
    assert (tmp_path / "m" / "fisher" / "c-checkbox.safetensors").is_file()


# -- LwF ----------------------------------------------------------------------------------------------------------
def test_lwf_distils_the_frozen_previous_model_on_fresh_noise_and_timesteps():
    model = _Toy()
    previous = _expert(model.lora(), anchors=torch.randn(6, 4), prompts=[f"p{i}" for i in range(6)])
    reg = _LwF([previous], DDPMScheduler(num_train_timesteps=1000), lam=1.0, batch=4)
    reg.start(model, lambda prompts: torch.arange(len(prompts))[:, None])

    gen = torch.Generator().manual_seed(0)
    (noisy1, t1, _), (noisy2, t2, _) = reg.draw(gen), reg.draw(gen)
    assert not torch.equal(t1, t2) and not torch.equal(noisy1, noisy2)  # drawn afresh at every step

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(noisy1, t1, None).pow(2).mean().backward()  # an update of the current LoRA away from the previous one
    opt.step()
    opt.zero_grad()
    current = model(noisy2, t2, None)
    teacher = reg.teacher_prediction(model, noisy2, t2, None)
    frozen = _Toy()  # the same init: the previous LoRA
    assert torch.allclose(teacher, frozen(noisy2, t2, None)) and not torch.allclose(teacher, current)
    assert torch.equal(model(noisy2, t2, None), current)  # the current LoRA is back after the teacher's forward

    loss = reg.loss(model, None, gen)  # the distillation term trains the current LoRA
    loss.backward()
    assert loss.item() > 0 and all(p.grad.abs().sum() > 0 for p in lora_layers(model.unet)["proj"])


def test_lwf_learns_at_bf16_its_teacher_and_student_in_the_frozen_weights_precision(tmp_path, tiny_base, concepts_root):
    ctx = _ctx(tmp_path, tiny_base)
    ctx.learn = TWO_STEPS.model_copy(update={"mixed_precision": "bf16"})
    method = METHODS["lwf"](ctx)
    for concept in _concepts(concepts_root):  # the second task runs the distillation term on the first's anchors
        method.learn(concept)
    assert all(torch.isfinite(v).all() for e in method.experts() for v in e.lora.values())


# -- C-LoRA -------------------------------------------------------------------------------------------------------
def test_clora_trains_task_2_on_top_of_task_1s_lora(tmp_path, tiny_base, concepts_root, monkeypatch):
    inits = _record_inits(monkeypatch)
    method = METHODS["c-lora"](_ctx(tmp_path, tiny_base))
    first, second = _concepts(concepts_root)
    method.learn(first)
    seen = {}
    monkeypatch.setattr(_CLoRA, "end", lambda self, model, data_loss: seen.update(unet=model.unet))
    method.learn(second)
    task1 = method.experts()[0]
    base = method.fresh_base().unet
    for m in task1.modules:
        trained_on = seen["unet"].get_submodule(m).base_layer.weight.detach().cpu()
        update = dense_update(task1, m)
        assert update.abs().max() > 1e-6
        assert torch.allclose(trained_on, base.get_submodule(m).weight + update, atol=1e-6)
    assert inits == [None, None]  # and its own LoRA is a fresh one, on top of the fused earlier ones


def test_clora_penalty_grows_with_the_overlap_of_the_new_update_with_the_earlier_one():
    past = torch.zeros(4, 4)
    past[:2, :2] = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    a, b = nn.Parameter(torch.zeros(2, 4)), nn.Parameter(torch.zeros(4, 2))
    reg = _CLoRA({"m": past}, lam=10.0)
    reg.layers = {"m": (a, b)}  # a hand-made layer (what `start` finds on a UNet): B A is whatever we set

    def penalty(update: torch.Tensor) -> float:
        with torch.no_grad():  # rank 2 factorisation of an update living in the first two columns
            a.copy_(torch.eye(4)[:2])
            b.copy_(update[:, :2])
        return reg.loss(None, None, None).item()

    none = torch.zeros(4, 4)
    none[2:, :2] = 1.0  # where the earlier update is zero
    half = none.clone()
    half[0, 0] = 1.0
    full = torch.ones(4, 4)
    full[:, 2:] = 0
    assert penalty(none) == 0.0
    assert penalty(half) == pytest.approx(10.0 * 1.0**2)  # (1 · 1)²
    assert penalty(full) == pytest.approx(10.0 * (1 + 4 + 9 + 0.25))
    assert penalty(2 * full) == pytest.approx(4 * penalty(full))


# -- MagMax -------------------------------------------------------------------------------------------------------
def test_magmax_keeps_per_entry_the_largest_magnitude_task_vector_with_its_sign():
    tau1 = torch.tensor([[1.0, -3.0], [0.5, 0.0]])
    tau2 = torch.tensor([[-2.0, 1.0], [0.1, -0.2]])
    experts = [_expert({"m.lora_A.weight": torch.eye(2), "m.lora_B.weight": t}) for t in (tau1, tau2)]
    merged = torch.tensor([[-2.0, -3.0], [0.5, -0.2]])  # a negative entry wins by magnitude, sign kept
    assert torch.equal(magmax_update(experts, "m"), merged)
    unet = nn.Module()
    unet.m = nn.Linear(2, 2, bias=False)
    w0 = unet.m.weight.detach().clone()
    magmax_pipeline(SimpleNamespace(unet=unet), experts, scale=0.5)
    assert torch.allclose(unet.m.weight, w0 + 0.5 * merged)


def test_magmax_learns_sequentially_and_merges_its_own_task_vectors(tmp_path, tiny_base, concepts_root, monkeypatch):
    assert issubclass(MagMax, Sequential) and issubclass(METHODS["magmax-alone"], AloneMethod)
    inits = _record_inits(monkeypatch)
    method = METHODS["magmax"](_ctx(tmp_path, tiny_base))
    for concept in _concepts(concepts_root):
        method.learn(concept)
    task1, task2 = method.experts()
    assert inits[0] is None and inits[1].keys() == task1.lora.keys()  # task 2 starts from task 1's LoRA
    assert all(torch.equal(inits[1][k], v) for k, v in task1.lora.items())
    assert not (tmp_path / "store").exists()  # nothing learned alone

    unet = method.sampler().pipe.unet.to("cpu")
    base = method.fresh_base().unet
    m = task1.modules[0]
    tau1, tau2 = dense_update(task1, m), dense_update(task2, m)
    want = torch.where(tau2.abs() > tau1.abs(), tau2, tau1)
    assert torch.allclose(unet.get_submodule(m).weight, base.get_submodule(m).weight + want, atol=1e-7)
