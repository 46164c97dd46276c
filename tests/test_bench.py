"""The continual benchmark: every method end to end on 3 tiny-world concepts with very few steps, the report,
resuming, and what makes each baseline what it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fl2t.bench.continual import Benchmark, fidelity_vs_ca, load_config, task_orders
from fl2t.bench.report import reading, write_report
from fl2t.bench.stats import comparisons, confusion, final_samples, forgetting, interval, method_stats
from fl2t.errors import Fl2tError
from fl2t.methods import METHODS
from fl2t.metrics import nearest_concepts

ALL = list(METHODS)
CONFIG = {
    "name": "t3",
    "world": True,
    "concepts": ["stripestar", "checkdiamond", "pastel"],
    "orders": 1,
    "prompts_per_concept": 2,
    "final_images_per_prompt": 2,  # the final row: 4 images per concept, the rows before it 2
    "class_images": 2,
    "multi": [["stripestar", "pastel"]],
    "sample": {"steps": 3},
    "learn": {"steps": 4, "num_anchors": 2, "anchor_steps": 2, "checkpoint_every": 0, "embedding_lr": 3e-2},
    "consolidate": {"relevance": "learned", "steps": 3},
    "fidelity": True,
}


@pytest.fixture(scope="session")
def bench_run(tmp_path_factory):
    """All methods, one order, 3 concepts: the benchmark object, its results, the config file."""
    root = tmp_path_factory.mktemp("bench")
    cfg_path = root / "t3.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    bench = Benchmark(load_config(cfg_path), root / "runs", ALL)
    results = bench.run()
    write_report(results, bench.out)
    return bench, results, cfg_path


def test_every_method_runs_end_to_end_and_scores_every_concept(bench_run):
    bench, results, _ = bench_run
    assert set(results["methods"]) == set(ALL)
    for method, r in results["methods"].items():
        run = r["runs"][0]
        assert run["order"] == CONFIG["concepts"]
        for name in CONFIG["concepts"]:
            s = run["final"][name]
            assert s["nia"] == pytest.approx(s["ia"] / bench.evaluated(name).ref_ia)
            assert "samples" not in s  # per-image scores stay in the task files
        # R is lower-triangular: concept i is scored from its own task on
        R = run["R"]["nia"]
        lower = [[True, False, False], [True, True, False], [True, True, True]]
        assert [[v is not None for v in row] for row in R] == lower
        assert (method == "oracle") == (run["multi"] is None)
        assert (bench.out / method / "order0" / "grids" / "pastel.png").is_file()


def test_task_files_keep_per_image_scores_paired_by_seed_across_rows_and_methods(bench_run):
    bench, results, _ = bench_run
    final_seeds, row_seeds = [0, 1, 2, 3], [0, 1]  # 2 prompts × 2 images in the last row, × 1 before it
    tas = []
    for method in ALL:
        tasks = bench.tasks(method, 0)
        for t, task in enumerate(tasks):
            for name in CONFIG["concepts"][: t + 1]:
                s, samples = task[name], task[name]["samples"]
                assert samples["seed"] == (final_seeds if t == 2 else row_seeds), (method, t, name)
                for metric in ("ia", "nia", "ca", "ta"):  # the means are the per-image scores averaged
                    assert s[metric] == pytest.approx(sum(samples[metric]) / len(samples[metric]), abs=1e-4)
                learned = CONFIG["concepts"][: t + 1]
                assert all(label in [*learned, "class"] for label in samples["label"])
                assert samples["ca"] == [float(label == name) for label in samples["label"]]
        if method != "oracle":
            multi, means = tasks[-1]["_multi_samples"]["stripestar+pastel"], tasks[-1]["_multi"]["stripestar+pastel"]
            assert len(multi["seed"]) == 4 and set(means) == {"nia", "ta", "presence"}  # presence: a world bench
            for score, mean in means.items():
                assert mean == pytest.approx(sum(multi[score]) / 4, abs=1e-4)
            assert set(multi["presence"]) <= {0.0, 1.0} and all(0 <= v <= 2.5 for v in multi["ta"])  # CLIPScore
            tas.extend(multi["ta"])
    assert any(v > 0 for v in tas)  # 2.5 max(cos, 0) may be 0 for an image, not for every one
    ev = bench.evaluated("stripestar")
    assert ev.seeds == final_seeds and ev.row == 2 and ev.prompts[2:] == ev.prompts[:2]  # copy 2 of each prompt
    for method, r in results["methods"].items():
        assert r["samples"] == dict.fromkeys(CONFIG["concepts"], 4)
        for metric in ("nia", "ca"):
            lo, hi = r["average_95"][metric]
            assert lo - 1e-9 <= r["average"][metric] <= hi + 1e-9, (method, metric)
        assert sum(r["confusion"]["rows"]["pastel"]) == pytest.approx(1.0)
    pairs = {(c["a"], c["b"]) for c in results["comparisons"] if c["metric"] == "nia"}
    assert pairs == {("fl2t", m) for m in ALL if m != "fl2t"} | {
        ("lookup", m) for m in ALL if m not in ("fl2t", "lookup")
    }
    assert all(c["samples"] == 12 for c in results["comparisons"] if c["metric"] == "nia")  # 3 concepts × 4 images


def test_a_final_row_with_fewer_images_than_the_rows_is_refused(tmp_path):
    cfg_path = tmp_path / "t3.yaml"
    cfg_path.write_text(yaml.safe_dump({**CONFIG, "images_per_prompt": 3, "final_images_per_prompt": 2}))
    with pytest.raises(Fl2tError, match=r"final_images_per_prompt: 2 is below images_per_prompt \(3\)"):
        load_config(cfg_path)


def test_results_of_an_older_run_without_per_image_scores_still_report(bench_run, tmp_path, monkeypatch):
    bench, _, _ = bench_run
    real = bench.tasks

    def without_samples(method, k):
        tasks = real(method, k)
        for task in tasks:
            task.pop("_multi_samples", None)
            for scores in task.values():
                scores.pop("samples", None)
        return tasks

    monkeypatch.setattr(bench, "tasks", without_samples)
    results = bench.results()
    assert results["comparisons"] == [] and "average_95" not in results["methods"]["fl2t"]
    md, _ = write_report(results, tmp_path)
    text = md.read_text()
    assert "| fl2t | " in text and re.search(r"\d±–", text) and "No paired comparison" in text
    assert "Confusion" not in text


# -- intervals, paired comparisons and the confusion matrix on task files made by hand ---------------------------
def fake_tasks(order, score, rows=2, final=4, labels=None, multi=None):
    """One order's task files: concept c's image with seed s scores score(c, s, last) (nIA, IA, CA, TA alike) in
    each row, `rows` images per concept before the last row and `final` in it; labels(c, s): its nearest concept;
    multi(s): the pair a+b's multi-concept score of image s."""
    tasks = []
    for t in range(len(order)):
        last = t == len(order) - 1
        task = {}
        for c in order[: t + 1]:
            seeds = list(range(final if last else rows))
            values = [score(c, s, last) for s in seeds]
            samples = {"seed": seeds, **{m: values for m in ("nia", "ia", "ca", "ta")}}
            samples["label"] = [labels(c, s) if labels else c for s in seeds]
            task[c] = {**{m: float(np.mean(values)) for m in ("nia", "ia", "ca", "ta")}, "samples": samples}
        if last and multi:
            task["_multi_samples"] = {
                "a+b": {"seed": [90_000 + s for s in range(4)], "nia": [multi(s) for s in range(4)]}
            }
        tasks.append(task)
    return tasks


def test_a_bootstrap_interval_covers_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    widths = []
    for n in (24, 240):
        x = rng.normal(0.4, 0.15, n)
        point, (lo, hi) = interval([x])
        assert point == pytest.approx(x.mean()) and lo < point < hi
        assert hi - lo == pytest.approx(2 * 1.96 * x.std() / n**0.5, rel=0.15)  # the normal approximation's
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]  # ten times the samples: about 1/√10 the width
    # stratified: the mean of per-concept means (a concept with more images does not weigh more)
    assert interval([np.zeros(2), np.ones(6)])[0] == pytest.approx(0.5)


def test_only_a_difference_whose_interval_excludes_zero_is_called_a_lead():
    order = ["a", "b", "c"]

    def base(c, s, last):  # the scatter between images that pairing removes
        return 0.3 + 0.2 * np.sin(7 * s + len(c)) + 0.1 * order.index(c)

    noise = [0.1, -0.1] * 2  # zero mean in every concept
    runs = {
        "fl2t": [fake_tasks(order, lambda c, s, last: base(c, s, last) + 0.05, multi=lambda s: 0.3)],
        "lwf": [fake_tasks(order, base, multi=lambda s: 0.3 + noise[s])],
        "lookup": [fake_tasks(order, lambda c, s, last: base(c, s, last) + 0.05 + noise[s])],
        "sequential": [fake_tasks(order, lambda c, s, last: base(c, s, last) + 0.2, multi=lambda s: 0.5)],
    }
    found = {(c["a"], c["b"], c["metric"]): c for c in comparisons(runs)}
    assert found[("fl2t", "lwf", "nia")]["diff"] == pytest.approx(0.05)
    assert found[("fl2t", "lwf", "nia")]["ci"] == pytest.approx([0.05, 0.05])  # paired: the scatter cancels
    assert ("lookup", "fl2t", "nia") not in found and ("lookup", "lwf", "nia") in found
    lines = reading({"methods": dict.fromkeys(runs, {}), "comparisons": list(found.values())})
    by_pair = {line.split(":")[0]: line for line in lines[1:]}
    assert "nIA +0.050 (+0.050 to +0.050): fl2t beats lwf" in by_pair["fl2t − lwf"]
    assert "multi nIA +0.000 (−0.100 to +0.100): no difference shown" in by_pair["fl2t − lwf"]
    assert "nIA +0.000" in by_pair["fl2t − lookup"] and "no difference shown" in by_pair["fl2t − lookup"]
    assert "beats" not in by_pair["fl2t − lookup"]
    assert "nIA −0.150 (−0.150 to −0.150): fl2t is below sequential" in by_pair["fl2t − sequential"]
    assert "multi nIA −0.200" in by_pair["fl2t − sequential"]
    assert "multi" not in by_pair["fl2t − lookup"]  # lookup has no multi-concept samples here


def test_orders_with_identical_images_are_not_extra_data():
    def score(c, s, last):
        return 0.2 + 0.3 * ((3 * s + len(c)) % 5) / 4

    one = fake_tasks(["a", "b", "c"], score, multi=lambda s: 0.1 * s)
    other = fake_tasks(["c", "a", "b"], score, multi=lambda s: 0.1 * s)  # another order, the same final images
    alone = method_stats([one], [["a", "b", "c"]], ["a", "b", "c"])
    three = method_stats([one, other, other], [["a", "b", "c"], ["c", "a", "b"], ["c", "a", "b"]], ["a", "b", "c"])

    def numbers(x):
        return [v for y in x.values() for v in numbers(y)] if isinstance(x, dict) else list(np.ravel(x))

    for key in ("samples", "average_95", "per_concept_95", "multi_95", "confusion"):
        assert numbers(three[key]) == pytest.approx(numbers(alone[key]), abs=1e-12), key
    width = alone["average_95"]["nia"][1] - alone["average_95"]["nia"][0]
    assert width > 0.05  # a real interval: three copies would have narrowed it by √3 had they counted


def test_forgetting_uses_the_samples_common_to_every_row_and_one_resample_for_all_rows():
    def score(c, s, last):
        if c == "b":
            return 0.5
        if s >= 2:  # images only the last row has: far off, and left out of forgetting
            return -1.0
        return (0.4 if last else 0.7) + 0.3 * s  # every image of a drops by exactly 0.3

    runs, orders = [fake_tasks(["a", "b"], score)], [["a", "b"]]
    stats = method_stats(runs, orders, ["a", "b"])
    assert forgetting(runs, orders, "nia") == pytest.approx(0.3)
    assert stats["forgetting_95"]["nia"] == pytest.approx([0.3, 0.3])  # independent resamples per row: wider
    a = final_samples(runs, "nia")["a"]
    assert sorted(a) == [0, 1, 2, 3] and np.mean(list(a.values())) == pytest.approx((0.4 + 0.7 - 2) / 4)


def test_the_confusion_matrix_puts_each_image_where_its_nearest_references_are():
    e = torch.eye(3)
    refs, class_images = {"a": e[:1], "b": e[1:2]}, e[2:3]
    images = {"a": torch.stack([e[0], e[0], e[1], e[2]]), "b": torch.stack([e[1], torch.tensor([0.6, 0.8, 0.0])] * 2)}
    labels = {c: nearest_concepts(images[c], refs, class_images) for c in images}
    runs = [fake_tasks(["a", "b"], lambda c, s, last: 0.0, labels=lambda c, s: labels[c][s])]
    got = confusion(runs, ["a", "b"])
    assert got["columns"] == ["a", "b", "class"]
    assert got["rows"]["a"] == pytest.approx([0.5, 0.25, 0.25]) and got["rows"]["b"] == pytest.approx([0.0, 1.0, 0.0])
    assert all(sum(row) == pytest.approx(1.0) for row in got["rows"].values())


def test_the_summary_and_per_concept_tables_fit_120_characters_for_10_concepts():
    from fl2t.bench.report import concept_table, confusion_tables, summary_table

    names = ["stripestar", "checkdiamond", "bullseye", "splitsquare", "dottri"]
    names += ["outline", "eyering", "crossbox", "pastel", "mosaic"]
    ci = [-0.1234, 0.9876]
    method = {
        "per_concept": {n: {"nia": -0.5 + 0.1 * i} for i, n in enumerate(names)},
        "average": {"nia": 0.422, "ia": 0.3, "ta": 1.12, "dino": 0.55, "ca": 0.562},
        "average_95": {"nia": ci, "ta": ci, "dino": ci, "ca": ci},
        "forgetting": {"nia": -0.0004, "ca": -0.319},
        "forgetting_95": {"nia": ci, "ca": ci},
        "multi": -0.163,
        "multi_95": ci,
        "order_spread": 0.0585,
        "confusion": {"columns": [*names, "class"], "rows": {n: [0.1] * 10 + [0.0] for n in names}},
    }
    results = {"name": "t", "concepts": names, "methods": {m: method for m in [*ALL, "lwf+compute", "cidm+tokens"]}}
    header, rows = summary_table(results)
    assert header == ["method", "nIA", "CA", "TA", "DINO", "forget nIA", "forget CA", "multi nIA", "order spread"]
    assert rows[0][1] == "0.422±.555" and rows[0][5] == "-0.000±.555"
    tables = [summary_table(results), concept_table(results), *[(h, r) for _, h, r in confusion_tables(results)]]
    for header, rows in tables:
        for line in ["| " + " | ".join(r) + " |" for r in [header, *rows]]:
            assert len(line) <= 120, line


def test_the_report_has_the_table_plots_and_grids(bench_run):
    bench, results, _ = bench_run
    md = (bench.out / "report.md").read_text()
    for method in ALL:
        assert f"| {method} |" in md
    assert "V1 stripestar" in md and "forget nIA" in md
    html = (bench.out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= len(ALL) + 1 + 3  # heat maps, curves, grids inlined
    assert (bench.out / "plots" / "forgetting.png").stat().st_size > 1000
    assert json.loads((bench.out / "results.json").read_text())["concepts"] == CONFIG["concepts"]


def test_a_rerun_skips_finished_tasks_and_gives_the_same_results(bench_run, monkeypatch):
    bench, results, cfg_path = bench_run

    def refuse(*a, **k):
        raise AssertionError("a finished task was run again")

    for cls in METHODS.values():
        monkeypatch.setattr(cls, "learn", refuse)
        monkeypatch.setattr(cls, "sampler", refuse)
    again = Benchmark(load_config(cfg_path), bench.out.parent, ALL).run()
    assert again["methods"] == json.loads(json.dumps(results["methods"]))


def test_a_stopped_run_resumes_where_it_stopped(bench_run, tmp_path, monkeypatch):
    """Stop after the first task's evaluation; the rerun learns only the remaining tasks."""
    _, _, cfg_path = bench_run
    bench = Benchmark(load_config(cfg_path), tmp_path, ["merge"])
    real = bench.evaluate

    def stop_after_first(method, names, learned, save_grid=None):
        if len(learned) == 2:
            raise KeyboardInterrupt
        return real(method, names, learned, save_grid)

    monkeypatch.setattr(bench, "evaluate", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        bench.run()
    done = bench.out / "merge" / "order0"
    assert (done / "task0.json").is_file() and not (done / "task1.json").exists()
    learned = []
    original = METHODS["merge"].learn
    monkeypatch.setattr(METHODS["merge"], "learn", lambda self, c: (learned.append(c.name), original(self, c)))
    Benchmark(load_config(cfg_path), tmp_path, ["merge"]).run()
    assert learned == ["pastel"]  # checkdiamond was learned before the stop; stripestar's task was done


def test_kept_task_files_without_the_methods_state_rebuild_the_state_before_the_next_task(
    bench_run, tmp_path, monkeypatch
):
    """A run folder whose task files were committed without the weights (another clone): the rerun learns the kept
    tasks again to rebuild the continued LoRA, evaluates only the missing task, and scores it as a full run did."""
    import shutil

    bench, results, cfg_path = bench_run
    shutil.copytree(bench.out / "sequential", tmp_path / "t3" / "sequential")
    shutil.copy(bench.out / "run.json", tmp_path / "t3" / "run.json")
    kept = tmp_path / "t3" / "sequential" / "order0"
    shutil.rmtree(kept / "state")
    (kept / "task2.json").unlink()
    fresh = Benchmark(load_config(cfg_path), tmp_path, ["sequential"])
    learned, evaluated = [], []
    original, real = METHODS["sequential"].learn, fresh.evaluate
    monkeypatch.setattr(METHODS["sequential"], "learn", lambda self, c: (learned.append(c.name), original(self, c)))
    monkeypatch.setattr(
        fresh,
        "evaluate",
        lambda m, names, done, save_grid=None: (evaluated.append(len(done)), real(m, names, done, save_grid))[1],
    )
    again = fresh.run()
    assert learned == ["stripestar", "checkdiamond", "pastel"] and evaluated == [3]

    def scores(path):  # what was measured, not how long it took
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "_compute"}

    assert scores(kept / "task2.json") == scores(bench.out / "sequential/order0/task2.json")
    for key in ("average", "forgetting"):
        assert again["methods"]["sequential"][key] == json.loads(json.dumps(results["methods"]["sequential"][key]))


def test_a_rerun_with_other_settings_is_refused_and_leaves_the_results(bench_run):
    bench, _, cfg_path = bench_run
    before = {p: p.read_bytes() for p in bench.out.rglob("task*.json")}
    with pytest.raises(Fl2tError, match=r"other settings \(learn differ\)"):
        Benchmark(load_config(cfg_path, learn={**CONFIG["learn"], "steps": 5}), bench.out.parent, ALL)
    assert before and before == {p: p.read_bytes() for p in bench.out.rglob("task*.json")}
    Benchmark(load_config(cfg_path, orders=2), bench.out.parent, ALL)  # more orders resume the same run
    record = bench.out / "run.json"
    run = json.loads(record.read_text())
    run["learn"].pop("embedding_norm_limit")  # recorded before the setting existed (None: off)
    record.write_text(json.dumps(run))
    try:
        Benchmark(load_config(cfg_path), bench.out.parent, ALL)  # resumes: an off setting it lacks is no difference
    finally:
        record.write_text(json.dumps({**run, "learn": {**run["learn"], "embedding_norm_limit": None}}))


def test_one_config_object_serves_two_benchmarks(bench_run):
    bench, _, cfg_path = bench_run
    cfg = load_config(cfg_path)
    Benchmark(cfg, bench.out.parent, ALL)
    assert cfg.prompts is None  # the world's prompts are filled into the benchmark's own copy
    Benchmark(cfg, bench.out.parent, ALL)  # and the second finds the same settings


def test_results_without_a_settings_record_are_not_resumed(tmp_path):
    cfg_path = tmp_path / "t3.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    old = tmp_path / "runs" / "t3" / "merge" / "order0"
    old.mkdir(parents=True)
    (old / "task0.json").write_text("{}")
    with pytest.raises(Fl2tError, match="without a record of their settings"):
        Benchmark(load_config(cfg_path), tmp_path / "runs", ["merge"])
    assert (old / "task0.json").read_text() == "{}"


def test_orders_are_the_listed_one_then_distinct_seeded_shuffles():
    cfg = load_config("tiny10")
    orders = task_orders(cfg, [c if isinstance(c, str) else c.path for c in cfg.concepts])
    assert len(orders) == 3 and orders[0] == cfg.concepts
    assert len({tuple(o) for o in orders}) == 3 and all(sorted(o) == sorted(orders[0]) for o in orders)
    assert orders == task_orders(cfg, orders[0])  # seeded: the same every time


def test_tiny10_scores_three_object_pairs_and_three_object_style_pairs_on_16_images_each():
    from fl2t.world import get_concept

    cfg = load_config("tiny10")
    kinds = ["+".join(sorted(get_concept(n).kind for n in pair)) for pair in cfg.multi]
    assert kinds.count("object+object") >= 3 and kinds.count("object+style") >= 3
    assert cfg.multi_images >= 16
    assert cfg.multi_prompts["object+object"] == "a {} to the left of a {}"  # as the world's two-object captions
    from fl2t.worldkit.check import ORACLE_PAIRS  # `fl2t world check --full`'s references: tiny10's object pairs

    assert [tuple(p) for p, k in zip(cfg.multi, kinds) if k == "object+object"] == list(ORACLE_PAIRS)


def test_a_methods_settings_come_from_the_config_as_its_typed_model(tmp_path):
    from fl2t.methods.ewc import EWCSettings
    from fl2t.methods.lwf import LwFSettings

    cfg_path = tmp_path / "t3.yaml"
    cfg_path.write_text(yaml.safe_dump({**CONFIG, "methods": {"ewc": {"ewc_lambda": "5e3"}}}))  # YAML reads 5e3 as text
    bench = Benchmark(load_config(cfg_path), tmp_path / "runs", ["ewc", "lwf"])
    ewc = bench.method("ewc", 0)
    assert ewc.settings == EWCSettings(ewc_lambda=5000.0)
    assert ewc.regulariser([], None).lam == 5000.0  # the penalty is weighted by the configured lambda
    assert bench.method("lwf", 0).settings == LwFSettings()  # not listed: its defaults
    assert LwFSettings().lwf_lambda == 1.0 and EWCSettings().ewc_lambda == 5e4


def test_an_unknown_method_setting_is_refused_with_what_it_takes(tmp_path):
    cfg_path = tmp_path / "t3.yaml"
    cfg_path.write_text(yaml.safe_dump({**CONFIG, "methods": {"ewc": {"lambda": 1.0}}}))
    refused = r"t3.yaml: methods: method ewc has no setting 'lambda' \(its settings: ewc_lambda, fisher_samples\)"
    with pytest.raises(Fl2tError, match=refused):
        load_config(cfg_path)
    cfg_path.write_text(yaml.safe_dump({**CONFIG, "methods": {"ewk": {}}}))
    with pytest.raises(Fl2tError, match=r"no method named 'ewk'; choose from oracle, "):
        load_config(cfg_path)


def test_shipped_configs_load_and_real_data_configs_ask_for_the_data(tmp_path):
    for name in ("tiny10", "tiny10-fidelity", "tiny10-fidelity400", "cifc", "dreambooth"):
        cfg = load_config(name)
        assert len(cfg.concepts) >= 10
    with pytest.raises(Fl2tError, match="--data"):
        Benchmark(load_config("cifc"), tmp_path, ["merge"])


def test_the_seed_config_is_tiny10_at_another_step1_seed_with_the_same_tuned_settings():
    tiny10, seed1 = load_config("tiny10"), load_config("tiny10-seed1")
    assert (
        seed1.learn.seed == 1 and tiny10.learn.seed == 0 and seed1.learn.model_copy(update={"seed": 0}) == tiny10.learn
    )
    same = {"name", "orders", "learn"}
    assert seed1.model_dump(exclude=same) == tiny10.model_dump(exclude=same)
    # tiny10's settings are those the tuning sweep chose on the shipped world (pasted from its tuned.yaml)
    tuned = yaml.safe_load((Path(__file__).parents[1] / "results" / "v2" / "tune" / "tuned.yaml").read_text())
    assert {m: tiny10.methods[m].model_dump(include=set(v)) for m, v in tuned["methods"].items()} == tuned["methods"]
    assert tiny10.consolidate.lambda_base == tuned["consolidate"]["lambda_base"]


# -- what makes each method what it is ---------------------------------------------------------------------
def _experts(bench, method):
    from fl2t.library import Library

    lib = Library(bench.out / method / "order0" / "state" / "library")
    return [lib.expert(n) for n in CONFIG["concepts"]]


def test_sequential_continues_one_lora_while_experts_start_from_zero(bench_run):
    bench, _, _ = bench_run
    from fl2t.library import Library

    alone = Library(bench.out / "experts").expert("checkdiamond")
    seq = _experts(bench, "sequential")
    key = next(k for k in seq[0].lora if k.endswith("lora_B.weight"))
    # lora_B starts at zero: after 4 steps an expert learned alone is small; the continued one carries task 1's
    assert (seq[1].lora[key] - seq[0].lora[key]).abs().max() < seq[1].lora[key].abs().max()
    assert not torch.equal(seq[1].lora[key], alone.lora[key])
    clora = _experts(bench, "c-lora")  # c-lora: a fresh LoRA per task, summed
    assert not torch.equal(clora[1].lora[key], seq[1].lora[key])


def test_ewc_keeps_a_fisher_per_task_over_its_lora(bench_run):
    from safetensors.torch import load_file

    bench, _, _ = bench_run
    for name, expert in zip(CONFIG["concepts"], _experts(bench, "ewc"), strict=True):
        fisher = load_file(bench.out / "ewc" / "order0" / "state" / "fisher" / f"{name}.safetensors")
        assert fisher.keys() == expert.lora.keys()
        flat = torch.cat([f.flatten() for f in fisher.values()])
        assert (flat >= 0).all() and flat.max() > 0


def test_clora_penalty_is_zero_where_earlier_updates_are_zero():
    from fl2t.methods.clora import _CLoRA

    reg = _CLoRA.__new__(_CLoRA)
    reg.lam = 1.0
    a = torch.nn.Parameter(torch.ones(2, 3))
    b = torch.nn.Parameter(torch.ones(4, 2))
    reg.layers = {"m": (a, b)}
    reg.past = {"m": torch.zeros(4, 3)}
    assert reg.loss(None, None, None).item() == 0.0
    reg.past["m"][0, 0] = 1.0  # one entry: (B A)[0, 0] = 2 -> (1 * 2)^2
    assert reg.loss(None, None, None).item() == pytest.approx(4.0)


def test_magmax_keeps_the_largest_magnitude_entry():
    from fl2t.expert import Expert
    from fl2t.methods.magmax import magmax_update

    def expert(b):
        lora = {"m.lora_A.weight": torch.eye(2), "m.lora_B.weight": torch.tensor(b)}
        return Expert(
            spec=None,
            lora=lora,
            token_embeddings=None,
            stable_embedding=None,
            anchors=None,
            anchor_prompts=[],
            base={},
            settings={},
        )

    got = magmax_update([expert([[1.0, -3.0], [0.5, 0.0]]), expert([[-2.0, 1.0], [0.1, 0.2]])], "m")
    assert torch.allclose(got, torch.tensor([[-2.0, -3.0], [0.5, 0.2]]))


def test_cidm_elastic_weights_are_the_4th_power_of_span_similarities_normalised():
    from types import SimpleNamespace

    from fl2t.methods.cidm import ElasticWeights

    # two concepts: A with one token, B with two; unit states chosen so the cosines are known
    e = torch.eye(4)
    states = {"<a> <b1> <b2>": torch.stack([e[0], e[1], e[2]]), "a prompt": torch.stack([e[0], (e[1] + e[3]) / 2**0.5])}
    ewa = ElasticWeights.__new__(ElasticWeights)
    ewa._states = lambda text: states[text]
    experts = [SimpleNamespace(spec=SimpleNamespace(tokens=tokens)) for tokens in (["<a>"], ["<b1>", "<b2>"])]
    ElasticWeights.__init__(ewa, None, experts)
    # A: max cos of <a> over the prompt = 1 -> 1^4; B: mean(1/√2, 0) -> (1/(2√2))^4
    sa, sb = 1.0, (1 / (2 * 2**0.5)) ** 4
    assert torch.allclose(ewa("a prompt"), torch.tensor([sa, sb]) / (sa + sb))


def test_cli_runs_the_benchmark_and_prints_the_table(bench_run, capsys):
    from test_cli import run

    bench, _, cfg_path = bench_run
    args = ["bench", "continual", "--config", cfg_path, "--methods", "merge,oracle", "--out", bench.out.parent]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "merge" in out and "report:" in out
    code, out, err = run(["bench", "continual", "--config", cfg_path, "--methods", "nope"], capsys)
    assert code == 2 and "unknown method" in err


def test_fl2t_batched_sampler_gives_the_images_of_fused_generation(bench_run):
    """The benchmark samples different prompts in one call through per-image hooks; a user's FL2TPipeline fuses
    one prompt at a time. Same images."""
    import numpy as np

    from fl2t.methods import MethodContext

    bench, _, _ = bench_run
    state = bench.out / "fl2t" / "order0" / "state"
    ctx = MethodContext(base=bench.base, learn=bench.cfg.learn, workdir=state, store=bench.out / "experts")
    m = METHODS["fl2t"](ctx)
    prompts = ["a <c-stripestar> star", "a circle in the style of <s-pastel>"]
    sampler = m.sampler()
    batched = sampler(prompts, [3, 4], steps=4)
    for p, seed, image in zip(prompts, [3, 4], batched):
        gen = torch.Generator().manual_seed(seed)
        fused = sampler.pipe(p, num_inference_steps=4, guidance_scale=5.0, generator=gen).images[0]
        assert np.abs(np.asarray(fused, dtype=float) - np.asarray(image, dtype=float)).max() <= 2


def test_fidelity_is_scored_for_every_method_and_agrees_with_the_library_record(bench_run):
    bench, results, _ = bench_run
    for method, r in results["methods"].items():
        R = r["runs"][0]["R"]["fidelity"]
        assert [[v is not None for v in row] for row in R] == [[True, False, False], [True, True, False], [True] * 3]
        if method == "oracle":  # each concept sampled with its own expert: the target itself
            assert all(abs(v - 1) < 1e-4 for row in R for v in row if v is not None), R
    # fl2t's sampler, scored by the benchmark, and the library's own record of its last consolidation agree
    lib = bench.method("fl2t", 0).library
    assert len(lib.versions()) == 2 * 3  # a learn and an accepted consolidation per task
    final = results["methods"]["fl2t"]["runs"][0]["final"]
    for name, f in lib.fidelity().items():
        assert final[name]["fidelity"] == pytest.approx(f, abs=1e-3)
    agreement = results["fidelity_vs_ca"]
    assert agreement["entries"] == (len(ALL) - 1) * 6
    assert "Fidelity against CA" in (bench.out / "report.md").read_text()


def test_fidelity_vs_ca_ranks_and_separates_lost_concepts():
    """Spearman and AUC on made-up results: fidelity that orders CA exactly gives 1 and 1."""

    def run(fid, ca):
        return {"order": ["a", "b"], "R": {"fidelity": fid, "ca": ca}, "final": {"a": {"ca": 1.0}, "b": {"ca": 1.0}}}

    oracle = run([[1.0, None], [1.0, 1.0]], [[1.0, None], [1.0, 1.0]])
    good = run([[0.9, None], [0.2, 0.8]], [[0.9, None], [0.1, 0.7]])
    bad = run([[0.5, None], [0.95, 0.3]], [[0.4, None], [1.0, 0.2]])
    results = {"methods": {"oracle": {"runs": [oracle]}, "m1": {"runs": [good]}, "m2": {"runs": [bad]}}}
    a = fidelity_vs_ca(results, resamples=200)
    assert a["entries"] == 6 and a["lost"] == 4  # CA 0.1, 0.7, 0.4, 0.2 are 20+ points below the oracle's 1.0
    assert a["spearman"] == pytest.approx(1.0) and a["auc"] == pytest.approx(1.0)
    assert a["spearman_95"][1] <= 1.0 + 1e-9 and a["auc_95"][0] <= 1.0
    assert fidelity_vs_ca({"methods": {"m1": {"runs": [good]}}}) == {}  # no oracle: nothing to compare with


def test_lookup_applies_the_named_experts_at_full_weight_and_equals_the_oracle_on_one_concept(bench_run):
    import numpy as np

    from fl2t.methods.lookup import named

    bench, _, _ = bench_run
    lookup, oracle = bench.method("lookup", 0), bench.method("oracle", 0)
    experts = lookup.experts()
    pipe = lookup.base_pipeline(experts)
    a, b, c = (e.spec.subject for e in experts)
    assert named(pipe, experts, f"a photo of {a}").tolist() == [1.0, 0.0, 0.0]
    assert named(pipe, experts, f"{a} in the style of {c}").tolist() == [1.0, 0.0, 1.0]
    assert named(pipe, experts, "a photo of a star").tolist() == [0.0, 0.0, 0.0]
    for e in experts:
        prompts, seeds = [f"a photo of {e.spec.subject}"] * 2, [0, 1]
        mine = lookup.sampler()(prompts, seeds, steps=3)
        alone = oracle.sampler(e.name)(prompts, seeds, steps=3)
        diff = max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() for x, y in zip(mine, alone))
        assert diff <= 2, (e.name, diff)  # the same update; hooks and peft's layers differ only in rounding


def test_lookup_routed_is_lookup_on_one_concept_and_puts_each_expert_where_its_tokens_attend(bench_run):
    import numpy as np
    import torch

    from fl2t.consolidate.pairs import AttentionProbe, routed_prediction
    from fl2t.fusion import AggregatedLoRA, stack_experts
    from fl2t.methods.lookup import LookupRouted
    from fl2t.span import SpanKV, prompt_ids

    bench, _, _ = bench_run
    lookup = bench.method("lookup", 0)
    routed = LookupRouted(lookup.ctx)  # the same experts
    experts = lookup.experts()
    a, b, _ = (e.spec.subject for e in experts)
    prompts, seeds = [f"a photo of {a}", f"a photo of {a} and {b}", "a photo of a star"], [0, 1, 2]
    mine, ref = routed.sampler()(prompts, seeds, steps=3), lookup.sampler()(prompts, seeds, steps=3)
    # one concept, none: lookup's images, byte for byte, at the same batch (routed samples them together, apart from
    # the two-concept prompt; another batch moves the CPU's rounding by a grey level)
    alone = lookup.sampler()([prompts[0], prompts[2]], [0, 2], steps=3)
    assert mine[0].tobytes() == alone[0].tobytes() and mine[2].tobytes() == alone[1].tobytes()
    assert mine[1].tobytes() != ref[1].tobytes()  # two concepts: routed, not summed

    # One step of the routed prediction for a prompt naming expert 0 alone: base + M (eps_0 - base), M in [0, 1] per
    # pixel (the same over channels), 1 where the attention on its tokens is largest, less elsewhere.
    pipe = lookup.base_pipeline(experts)
    stack = stack_experts(experts, pipe.unet)
    agg, probe = AggregatedLoRA(pipe.unet, stack), AttentionProbe(pipe.unet)
    span = SpanKV(pipe.unet, stack, [pipe.tokenizer.convert_tokens_to_ids(e.spec.tokens) for e in experts])
    cond = pipe.encode_prompt(prompts[0], "cpu", 1, False)[0]
    size = pipe.unet.config.sample_size
    x, t = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0)), 500
    with torch.no_grad():
        base = pipe.unet(x, t, cond).sample
        agg.set(torch.tensor([[[1.0, 0.0, 0.0]]]).expand(1, len(stack.modules), 3))
        alone = pipe.unet(x, t, cond).sample
        agg.off()
        out = routed_prediction(
            pipe.unet, agg, probe, x, t, cond, span.spans(prompt_ids(pipe.tokenizer, prompts[:1])), [(0,)]
        )
    gap = alone - base
    share = ((out - base) * gap).sum(1) / (gap * gap).sum(1)  # (1, h, w): the mask, by least squares over channels
    assert torch.allclose(out, base + share[:, None] * gap, atol=1e-4)  # one mask for every channel
    assert float(share.min()) >= -1e-4 and abs(float(share.max()) - 1) < 1e-3 and float(share.min()) < 0.9
    assert np.isfinite(share.numpy()).all()


def test_compute_is_counted_per_task_and_the_shared_experts_charged_to_the_methods_that_use_them(bench_run):
    bench, results, _ = bench_run
    steps, n = CONFIG["learn"]["steps"], len(CONFIG["concepts"])
    records = [json.loads((bench.out / "store_compute" / f"{c}.json").read_text()) for c in CONFIG["concepts"]]
    assert [r["steps"] for r in records] == [steps] * n  # each expert alone learned once, by the expert units
    anchors = CONFIG["learn"]["num_anchors"] * CONFIG["learn"]["anchor_steps"] * 2  # guided: 2 rows an image
    assert all(r["unet_forwards_grad"] >= steps and r["unet_forwards_nograd"] >= anchors for r in records)
    for method, r in results["methods"].items():
        c = r["compute"]
        assert c["step1"]["steps"] >= steps * n and c["step1"]["unet_forwards_grad"] >= steps * n, method
        assert c["total"]["seconds"] > 0 and c["total"]["peak_mb"] is not None, method
        task = json.loads((bench.out / method / "order0" / "task0.json").read_text())
        assert task["_compute"]["concept"] == CONFIG["concepts"][0]
        if c["uses_store"]:  # the store's work, not the method's lookups in it
            assert c["step1"]["steps"] == steps * n
            assert c["step1"]["unet_forwards_nograd"] == sum(r["unet_forwards_nograd"] for r in records)
    assert results["methods"]["oracle"]["compute"]["step2"]["steps"] == 0
    assert results["methods"]["fl2t"]["compute"]["step2"]["steps"] >= CONFIG["consolidate"]["steps"]
    md = (bench.out / "report.md").read_text()
    assert "## Compute" in md and f"| oracle | {steps * n} | 0 |" in md


def test_the_world_dino_encoder_on_a_world_without_one_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import fl2t.world

    v1 = tmp_path / "v1-weights"  # a v1 world installed in the package: a base, no DINO-like encoder
    (v1 / "base").mkdir(parents=True)
    for marker in ("base/model_index.json", "manifest.json"):
        (v1 / marker).write_text("{}")
    monkeypatch.setattr(fl2t.world, "WEIGHTS_DIR", v1)
    cfg_path = tmp_path / "t3.yaml"
    cfg_path.write_text(yaml.safe_dump({**CONFIG, "dino": "world"}))
    with pytest.raises(Fl2tError, match=r"has no DINO-like encoder .*`fl2t world build --v1`"):
        Benchmark(load_config(cfg_path), tmp_path / "runs", ["merge"])
    assert not list((tmp_path / "runs").rglob("*.json"))  # nothing learned or recorded
