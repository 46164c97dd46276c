"""`fl2t demo`: the built-in `demo` config run over two processes, on a tiny budget; its generated reading."""

from __future__ import annotations

import json
import math

from fl2t.bench.continual import load_config
from fl2t.demo import METHODS, reading, run_demo

TINY = {  # the demo's protocol on two of its concepts, at a budget of seconds
    "concepts": ["stripestar", "pastel"],
    "learn": {"steps": 2, "num_anchors": 1, "anchor_steps": 2, "checkpoint_every": 0},
    "consolidate": {"relevance": "learned", "steps": 2},  # as demo.yaml: fl2t is the learned Step 2
    "prompts_per_concept": 1,
    "class_images": 1,
    "sample": {"steps": 2, "guidance": 5.0},
}


def test_the_demo_config_is_tiny10s_budget_with_lookup_and_the_strongest_baseline_beside_fl2t():
    cfg, tiny10 = load_config("demo"), load_config("tiny10")
    assert cfg.learn == tiny10.learn  # 400 steps, 8 anchors: the concepts are learned
    assert cfg.consolidate == tiny10.consolidate  # Step 2 as in the table
    assert all(cfg.methods[m] == tiny10.methods[m] for m in cfg.methods)  # the tuned settings
    assert set(cfg.concepts) <= set(tiny10.concepts) and any(len(p) == 2 for p in cfg.multi)
    assert set(METHODS) == {"oracle", "lookup", "fl2t", "cidm+tokens", "lwf"}


def test_the_demo_runs_over_two_processes_and_reports_every_method(tmp_path, capsys):
    results = run_demo(tmp_path, None, lambda text: None, processes=2, **TINY)
    out = capsys.readouterr().out
    assert results["concepts"] == TINY["concepts"] and set(results["methods"]) == set(METHODS)
    for r in results["methods"].values():
        assert all(math.isfinite(r["average"][k]) for k in ("nia", "ca"))
    runs = tmp_path / "demo"
    owners = {json.loads(p.read_text())["unit"]: json.loads(p.read_text())["owner"] for p in runs.glob("jobs/*.json")}
    assert owners["run.lwf.order0"] == "shard 1/2"  # the second process
    assert {owners[f"run.{m}.order0"] for m in ("oracle", "lookup", "fl2t", "cidm+tokens")} == {"shard 0/2"}
    assert " ".join(reading(results)) in out  # the reading printed under the tables
    library = runs / "fl2t" / "order0" / "state" / "library"
    assert f"fl2t library with 2 concepts: {library}" in out and (library / "consolidated").is_dir()
    assert '"a <c-stripestar> star in the style of <s-pastel>"' in out  # the pair, with the config's template


def _results(nia: dict[str, float]) -> dict:
    concepts = ["stripestar", "pastel"]
    methods = {
        m: {
            "average": {"nia": v, "ca": v / 2},
            "forgetting": {"nia": 0.01, "ca": 0.02},
            "multi": None if m == "oracle" else 0.3,
            "per_concept": {"stripestar": {"ca": 0.75}, "pastel": {"ca": 0.25}},
        }
        for m, v in nia.items()
    }
    return {"concepts": concepts, "methods": methods}


def test_the_reading_is_generated_from_the_numbers():
    text = " ".join(reading(_results({"oracle": 0.6, "lookup": 0.41, "lwf": 0.38, "fl2t": 0.4})))
    assert (
        "reaches nIA 0.600 and CA 0.300; 1 of 2 concepts are recognised in at least half their images (stripestar)"
        in text
    )
    assert "lwf: final nIA 0.380, CA 0.190, forgetting 0.010 nIA / 0.020 CA" in text
    assert text.endswith("Highest final nIA without the oracle: lookup, then fl2t; no paired comparison of the two.")
    results = _results({"oracle": 0.6, "lookup": 0.38, "lwf": 0.41, "fl2t": 0.4})
    results["comparisons"] = [{"a": "fl2t", "b": "lwf", "metric": "nia", "diff": -0.01, "ci": [-0.03, 0.01]}]
    assert " ".join(reading(results)).endswith(
        "lwf, then fl2t; not a lead: the paired interval of the difference includes 0."
    )
    results["comparisons"][0]["ci"] = [-0.02, -0.001]
    assert " ".join(reading(results)).endswith("lwf, then fl2t; a lead the paired interval shows.")
