"""Compute counted per method (bench/compute.py): the counter on a tiny UNet, the store's work charged to the methods
that use it, and the report's compute table."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.modules import module as torch_module
from torch.optim import optimizer as torch_optimizer

from fl2t.bench import compute
from fl2t.bench.compute import COUNTS, Counter, counted_task, method_compute
from fl2t.bench.report import COMPUTE_HEADER, compute_note, compute_rows
from fl2t.methods.base import AloneMethod, Method, MethodContext
from fl2t.models import tiny_random_pipeline


@pytest.fixture(scope="module")
def unet():
    model = tiny_random_pipeline().unet
    model.requires_grad_(False)
    return model


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(n, 4, 16, 16), torch.full((n,), 10), torch.randn(n, 5, 32)


def test_the_counter_counts_steps_and_unet_forwards_with_and_without_a_graph(unet):
    trained = unet.conv_out.weight
    opt = torch.optim.SGD([trained], lr=1e-3)
    other = torch.nn.Linear(3, 3)
    with Counter() as c:
        trained.requires_grad_(True)
        for _ in range(3):  # training: batch 2, a graph, a step
            loss = unet(*_inputs(2)).sample.pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            for _ in range(2):  # sampling, the sample as a keyword as diffusers' pipelines call it
                x, t, states = _inputs(3)
                unet(sample=x, timestep=t, encoder_hidden_states=states, return_dict=False)
        trained.requires_grad_(False)
        unet(*_inputs(4))  # a teacher: grad mode, frozen weights, no graph
        other(torch.randn(5, 3))  # not a UNet
    counts = c.counts
    assert counts["steps"] == 3
    assert (counts["unet_calls_grad"], counts["unet_forwards_grad"]) == (3, 6)
    assert (counts["unet_calls_nograd"], counts["unet_forwards_nograd"]) == (3, 10)
    assert counts["seconds"] > 0
    assert counts["peak_mb"] is not None and counts["peak_mb"] >= 0  # Linux: resident memory


def test_the_counter_removes_its_hooks_on_exit_even_after_an_error(unet):
    forward_hooks = len(torch_module._global_forward_hooks)
    step_hooks = len(torch_optimizer._global_optimizer_post_hooks)
    with pytest.raises(RuntimeError), Counter() as c:
        assert len(torch_module._global_forward_hooks) == forward_hooks + 1
        raise RuntimeError("stop")
    assert len(torch_module._global_forward_hooks) == forward_hooks
    assert len(torch_optimizer._global_optimizer_post_hooks) == step_hooks
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    with torch.no_grad():
        unet(*_inputs(1))
    p.sum().backward()
    opt.step()
    assert all(c.counts[k] == 0 for k in COUNTS if k != "seconds")


class _Tiny(Method):
    """A method whose learn takes two optimizer steps and whose consolidate one; `store` set by the test."""

    name = "tiny"

    def learn(self, concept) -> None:
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=0.1)
        for _ in range(2):
            p.sum().backward()
            opt.step()
        self.shared.add(concept.name)
        self._done(concept.name)

    def consolidate(self) -> None:
        p = torch.nn.Parameter(torch.zeros(2))
        p.sum().backward()
        torch.optim.SGD([p], lr=0.1).step()


class _TinyAlone(_Tiny, AloneMethod):
    """The same, as a method whose experts are the store's."""


class _Concept:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_learn_that_fills_the_store_writes_its_record_and_counts_once(tmp_path, monkeypatch):
    shared: set[str] = {"b"}  # b was in the store before (learned by the benchmark's expert unit)
    monkeypatch.setattr(compute, "_in_store", lambda store, name: name in shared)
    ctx = MethodContext(base="unused", learn=None, workdir=tmp_path / "m" / "order0" / "state", store=tmp_path / "s")
    m = _TinyAlone(ctx)
    m.shared = shared
    first = counted_task(m, _Concept("a"), tmp_path)
    assert first["uses_store"] and first["store_learned"]
    assert (first["step1"]["steps"], first["step2"]["steps"]) == (2, 1)
    assert json.loads((tmp_path / "store_compute" / "a.json").read_text())["steps"] == 2
    second = counted_task(m, _Concept("b"), tmp_path)
    assert not second["store_learned"] and not (tmp_path / "store_compute" / "b.json").exists()
    # a resumed task whose learn finished before the interruption: its Step 1 was not seen
    assert counted_task(m, _Concept("a"), tmp_path)["step1"] is None


def _tasks(entries):
    """One order's task files (as loaded) with these `_compute` entries."""
    return [{"x": {"ia": 0.5}, "_compute": e} for e in entries]


def _phase(steps, grad=0, nograd=0, seconds=1.0, peak=10.0):
    return {
        "steps": steps,
        "unet_calls_grad": grad,
        "unet_calls_nograd": nograd,
        "unet_forwards_grad": 2 * grad,
        "unet_forwards_nograd": 2 * nograd,
        "seconds": seconds,
        "peak_mb": peak,
    }


def _entry(concept, step1, step2, uses_store=False, store_learned=False):
    return {
        "concept": concept,
        "step1": step1,
        "step2": step2,
        "uses_store": uses_store,
        "store_learned": store_learned,
    }


def test_the_store_is_charged_to_every_method_that_uses_it_and_orders_are_averaged(tmp_path):
    (tmp_path / "store_compute").mkdir()
    for name, steps in (("a", 100), ("b", 50)):
        (tmp_path / "store_compute" / f"{name}.json").write_text(json.dumps(_phase(steps, grad=steps, peak=30.0)))
    alone = [  # order 0 learned a's store expert in its learn; b came from the store
        _entry("a", _phase(100, 100, peak=30.0), _phase(7, 7), uses_store=True, store_learned=True),
        _entry("b", _phase(0), _phase(9, 9, 4), uses_store=True),
    ]
    c = method_compute([_tasks(alone)], tmp_path)
    assert c["uses_store"]
    assert c["step1"]["steps"] == 150 and c["step1"]["unet_forwards_grad"] == 300  # the store's, once
    assert c["step1"]["seconds"] == pytest.approx(3.0)  # a's record, b's record, b's own learn
    assert c["step2"]["steps"] == 16 and c["step2"]["unet_forwards_nograd"] == 8
    assert c["total"]["steps"] == 166 and c["total"]["peak_mb"] == 30.0

    own = [_entry("a", _phase(10), _phase(0)), _entry("b", _phase(20), _phase(0))]
    other = [_entry("b", _phase(40), _phase(0)), _entry("a", _phase(50), _phase(0))]
    c = method_compute([_tasks(own), _tasks(other)], tmp_path)
    assert not c["uses_store"] and c["step1"]["steps"] == (30 + 90) / 2 and c["step2"]["steps"] == 0

    # a resumed task whose learn was not seen: nothing lost for a store user, unknown for a method of its own
    resumed = [_entry("a", None, _phase(0), True), _entry("b", None, _phase(0), True)]
    assert method_compute([_tasks(resumed)], tmp_path)["step1"]["steps"] == 150
    unseen = [_entry("a", _phase(10), _phase(0)), _entry("b", None, _phase(0))]
    assert method_compute([_tasks(unseen)], tmp_path) is None
    (tmp_path / "store_compute" / "b.json").unlink()  # a store record missing: unknown, not zero
    assert method_compute([_tasks(alone)], tmp_path) is None
    assert method_compute([[{"x": {"ia": 0.5}}]], tmp_path) is None  # an older run's task without `_compute`


def test_the_compute_table_renders_counts_and_dashes_for_uncounted_runs():
    phase = _phase(12, grad=12, nograd=3, seconds=4.26, peak=123.4)
    results = {
        "methods": {
            "fl2t": {"compute": {"step1": phase, "step2": _phase(30), "total": phase, "uses_store": True}},
            "old": {"average": {}},
        }
    }
    rows = compute_rows(results)
    assert rows == [["fl2t", "12", "30", "24", "6", "4.3", "123"], ["old", *["–"] * (len(COMPUTE_HEADER) - 1)]]
    assert "(fl2t)" in compute_note(results)
