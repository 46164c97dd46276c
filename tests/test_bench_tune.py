"""Variants (a method with other settings as a benchmark row), the tuning-only concepts, and `fl2t bench tune`, on
two tuning concepts with a few Step-1 steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fl2t.bench.continual import BUILTIN, Benchmark, load_config, make_config, read_config
from fl2t.bench.tune import chosen, grid_variants, run_tune
from fl2t.errors import Fl2tError
from fl2t.library import Library
from fl2t.methods import method_settings
from fl2t.world.concepts import CONCEPTS, TUNING_CONCEPTS, concept_appearances, get_concept, tuning_appearances

TUNING = {c.name for c in TUNING_CONCEPTS}
CONFIG = {
    "name": "v2",
    "world": True,
    "concepts": ["dotcircle", "echo"],
    "orders": 1,
    "prompts_per_concept": 2,
    "class_images": 2,
    "sample": {"steps": 2},
    "learn": {"steps": 2, "num_anchors": 1, "anchor_steps": 1, "checkpoint_every": 0, "embedding_lr": 3e-2},
    "consolidate": {"relevance": "learned", "steps": 2},
    "variants": {
        "seq@4": {"method": "sequential", "learn": {"steps": 4}},
        "merge@scale=0.25": {"method": "merge", "settings": {"scale": 0.25}},
    },
}
ROWS = ["seq@4", "merge", "merge@scale=0.25"]  # a variant with a learn override first: it must not learn the store
GRID = {"merge": {"scale": [0.25, 1.0]}}


def _write(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory):
    """The rows ROWS, then `tune` over GRID in the same run folder (its points are variants added to the run: it
    resumes, with the experts learned alone shared): the benchmark, its results, the config, tune's answer, the
    tuning config, and whether the point that was already a variant of the run kept its finished work."""
    root = tmp_path_factory.mktemp("variants")
    cfg_path = _write(root / "v2.yaml", CONFIG)
    bench = Benchmark(load_config(cfg_path), root / "runs", ROWS)
    results = bench.run()
    done = bench.out / "merge@scale=0.25" / "order0" / "task1.json"
    stamp = done.stat().st_mtime_ns
    # The grid's first point is the variant merge@scale=0.25 above, defined the same: its finished work is taken.
    tune_path = _write(root / "tune.yaml", {**{k: v for k, v in CONFIG.items() if k != "variants"}, "grid": GRID})
    tuned = run_tune(tune_path, None, root / "runs", None, lambda text: None)
    return bench, results, cfg_path, tuned, tune_path, done.stat().st_mtime_ns == stamp


# -- variants --------------------------------------------------------------------------------------------------
def _steps(library_path, name):
    return Library(library_path).expert(name).settings["steps"]


def test_a_variant_learns_with_its_own_learn_settings_and_the_shared_store_keeps_the_configs(variant_run):
    bench, results, *_ = variant_run
    assert list(results["methods"]) == ROWS
    assert results["variants"]["seq@4"] == {
        "method": "sequential",
        "learn": {"steps": 4},
        "consolidate": {},
        "settings": {},
    }
    for name in CONFIG["concepts"]:
        assert _steps(bench.out / "seq@4" / "order0" / "state" / "library", name) == 4
        assert _steps(bench.out / "experts", name) == 2  # learned through the first row, at the config's steps


def test_a_variant_runs_with_its_own_method_settings_in_its_own_folder(variant_run):
    bench, results, *_ = variant_run
    assert bench.method("merge@scale=0.25", 0).settings.scale == 0.25 and bench.method("merge", 0).settings.scale == 1.0
    mine, base = (
        json.loads((bench.out / m / "order0" / "task1.json").read_text()) for m in ("merge@scale=0.25", "merge")
    )
    assert mine["dotcircle"]["ia"] != base["dotcircle"]["ia"]  # a quarter of the update: other images
    assert results["methods"]["merge@scale=0.25"]["average"]["nia"] != results["methods"]["merge"]["average"]["nia"]


def test_a_new_variant_resumes_the_run_and_a_changed_one_is_refused(variant_run):
    bench, _, cfg_path, *_ = variant_run
    more = {**CONFIG["variants"], "merge@2": {"method": "merge", "settings": {"scale": 2.0}}}
    Benchmark(load_config(cfg_path, variants=more), bench.out.parent, ["merge@2"])
    assert {"seq@4", "merge@scale=0.25", "merge@2"} <= set(json.loads((bench.out / "run.json").read_text())["variants"])
    changed = {**CONFIG["variants"], "seq@4": {"method": "sequential", "learn": {"steps": 5}}}
    with pytest.raises(Fl2tError, match=r"other settings \(variant seq@4 differ\)"):
        Benchmark(load_config(cfg_path, variants=changed), bench.out.parent, ["seq@4"])


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"method": "ewk"}, r"variants: variant bad: no method named 'ewk'; choose from oracle"),
        ({"method": "ewc", "settings": {"lambda": 1}}, r"variant bad: method ewc has no setting 'lambda'"),
        ({"method": "sequential", "learn": {"steps": 0}}, r"variant bad: learn.steps: Input should be greater"),
        ({"method": "fl2t", "learn": {"steps": 9}}, r"variant bad: fl2t takes the experts learned alone from the run"),
        ({"method": "lwf", "colour": 1}, r"variants.bad.colour: Extra inputs"),
    ],
)
def test_a_bad_variant_is_refused_naming_it(tmp_path, variant, message):
    with pytest.raises(Fl2tError, match=message):
        load_config(_write(tmp_path / "v.yaml", {**CONFIG, "variants": {"bad": variant}}))


def test_a_variant_may_not_take_a_methods_name_and_an_unknown_row_lists_the_variants(tmp_path):
    with pytest.raises(Fl2tError, match="variant lwf: a method has that name"):
        load_config(_write(tmp_path / "v.yaml", {**CONFIG, "variants": {"lwf": {"method": "lwf"}}}))
    with pytest.raises(Fl2tError, match=r"unknown method\(s\) merge@3; choose from .*fl2t, merge@scale=0.25, seq@4"):
        Benchmark(load_config(_write(tmp_path / "v2.yaml", CONFIG)), tmp_path, ["merge@3"])


# -- the tuning-only concepts ------------------------------------------------------------------------------------
def test_tuning_concepts_are_new_objects_and_a_style_with_new_tokens():
    from fl2t.models import TOKENIZER_DIR

    assert len(TUNING_CONCEPTS) >= 3 and {c.kind for c in TUNING_CONCEPTS} == {"object", "style"}
    assert not TUNING & {c.name for c in CONCEPTS} and not {c.token for c in TUNING_CONCEPTS} & {
        c.token for c in CONCEPTS
    }
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text())
    assert not any(c.token in vocab or c.token + "</w>" in vocab for c in TUNING_CONCEPTS)
    assert not tuning_appearances() & concept_appearances()
    assert all(get_concept(c.name) is c for c in TUNING_CONCEPTS)


def test_the_base_models_pretraining_never_shows_a_tuning_look():
    from fl2t.world.generator import STYLES, TUNING_PATTERNS, TUNING_STYLES
    from fl2t.worldkit.build import pretraining_scenes

    scenes = pretraining_scenes(0, 3000)
    assert not any((s.shape, s.pattern, s.colour, s.colour2) in tuning_appearances() for s in scenes)
    assert not {s.pattern for s in scenes} & set(TUNING_PATTERNS) and not set(TUNING_STYLES) & set(STYLES)


def test_tuning_patterns_and_style_are_drawn():
    from dataclasses import replace

    from fl2t.world.generator import COLOURS, Scene, render

    plain = Scene("diamond", "green", "black", "in the center", "large", colour2="blue")
    for pattern in ("quartered", "banded"):
        img = np.asarray(render(replace(plain, pattern=pattern))).astype(int)
        blue = (np.abs(img - np.array(COLOURS["blue"])).max(axis=2) <= 12).mean()
        green = (np.abs(img - np.array(COLOURS["green"])).max(axis=2) <= 12).mean()
        assert blue > 0.04 and green > 0.04, (pattern, blue, green)
    echo = np.asarray(render(replace(plain, colour2=None, style="echo"))).astype(int)
    faded = np.abs(echo - (np.array(COLOURS["green"]) + 15) / 2).max(axis=2) <= 14  # half-way to the black
    assert faded.mean() > 0.02 and not np.array_equal(echo, np.asarray(render(replace(plain, colour2=None))))


def test_no_shipped_benchmark_but_tune_uses_the_tuning_concepts_and_tune_uses_only_them():
    for path in BUILTIN.glob("*.yaml"):
        _, raw = read_config(path)
        names = {c if isinstance(c, str) else c["path"] for c in raw["concepts"]}
        if path.stem == "tune":
            assert names <= TUNING and len(names) >= 3
        else:
            assert not names & TUNING, path.name


def test_the_shipped_tune_config_has_tiny10s_budget_and_a_valid_grid():
    source, raw = read_config("tune")
    grid = grid_variants(raw.pop("grid"), source)
    cfg = make_config(source, {**raw, "variants": {n: v for points in grid.values() for n, v in points.items()}})
    tiny10 = load_config("tiny10")
    assert cfg.learn == tiny10.learn and cfg.consolidate == tiny10.consolidate and cfg.orders == 1
    tuned = {"ewc", "lwf", "c-lora", "merge", "magmax", "magmax-alone", "cidm", "cidm+tokens", "fl2t"}
    assert tuned <= set(grid) and all(len(p) >= 2 for p in grid.values())
    assert cfg.row("ewc@ewc_lambda=5e4").settings.ewc_lambda == 5e4
    assert cfg.row("cidm@ewa_scale=0.5").settings.ewa_scale == 0.5
    assert cfg.row("magmax-alone@scale=0.5").settings.scale == 0.5
    assert cfg.row("fl2t@lambda_base=0.1").consolidate.lambda_base == 0.1
    with pytest.raises(Fl2tError, match="run it with `fl2t bench tune"):
        load_config("tune")


# -- fl2t bench tune ---------------------------------------------------------------------------------------------
def test_the_choice_is_the_best_nia_then_the_lower_forgetting_then_the_earlier_point():
    def row(nia, forgetting):
        return {"average": {"nia": nia}, "forgetting": {"nia": forgetting}}

    results = {"methods": {"a@1": row(0.5, 0.1), "a@2": row(0.7, 0.3), "a@3": row(0.7, 0.2), "a@4": row(0.7, 0.2)}}
    assert chosen(results, {"a": ["a@1", "a@2", "a@3", "a@4"]}) == {"a": "a@3"}
    assert chosen(results, {"a": ["a@1", "a@2"]}) == {"a": "a@2"}


def test_tune_chooses_the_best_measured_nia_and_writes_settings_a_config_takes(variant_run):
    bench, _, _, tuned, _, reused = variant_run
    assert reused  # the point defined as the run's variant merge@scale=0.25 was not run again
    written = json.loads((bench.out / "results.json").read_text())
    points = ["merge@scale=0.25", "merge@scale=1"]
    assert list(written["methods"]) == points  # the tune run's rows: the grid's points
    best = max(written["methods"][p]["average"]["nia"] for p in points)
    assert written["methods"][tuned["chosen"]["merge"]]["average"]["nia"] == best
    saved = yaml.safe_load(tuned["path"].read_text())
    assert set(saved) == {"methods"} and set(saved["methods"]) == {"merge"}
    chosen_settings = written["variants"][tuned["chosen"]["merge"]]["settings"]
    assert method_settings("merge", saved["methods"]["merge"]) == method_settings("merge", chosen_settings)
    assert load_config("tiny10", methods=saved["methods"]).methods["merge"].scale in (0.25, 1.0)


def test_a_variants_settings_are_the_configs_for_its_method_with_its_own_over_them(tmp_path):
    variants = {"same": {"method": "ewc"}, "own": {"method": "ewc", "settings": {"ewc_lambda": "1e2"}}}
    cfg = load_config(
        _write(tmp_path / "v.yaml", {**CONFIG, "methods": {"ewc": {"ewc_lambda": 5.0}}, "variants": variants})
    )
    assert cfg.row("same").settings.ewc_lambda == 5.0 and cfg.row("own").settings.ewc_lambda == 100.0
    assert cfg.variants["own"].settings == {"ewc_lambda": 100.0}  # typed: the run's record reads 100.0 for 1e2


def test_tune_from_the_command_line_resumes_and_prints_the_table(variant_run, capsys, monkeypatch):
    from fl2t.methods import METHODS
    from test_cli import run

    bench, *_, tune_path, _ = variant_run
    runs = bench.out.parent

    def refuse(*a, **k):
        raise AssertionError("a finished task was run again")

    monkeypatch.setattr(METHODS["merge"], "learn", refuse)
    monkeypatch.setattr(METHODS["merge"], "sampler", refuse)
    code, out, err = run(["bench", "tune", "--config", tune_path, "--methods", "merge", "--out", runs], capsys)
    assert code == 0, err
    assert "scale=0.25" in out and "*" in out and "tuned settings:" in out
    code, out, err = run(["bench", "tune", "--config", tune_path, "--methods", "lwf", "--out", runs], capsys)
    assert code == 2 and "no grid for lwf" in err
