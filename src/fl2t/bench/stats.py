"""95% bootstrap intervals for the continual benchmark's numbers, paired comparisons of methods, and the
confusion matrix (DESIGN §4, "Intervals" and "Confusion matrix").

The data are the per-image scores each task file keeps (`samples`: one entry per (prompt, seed) of a concept,
keyed by its seed, which also fixes its prompt). A sample is a (concept, seed) pair; the same pairs are generated
by every method and in every order, so two methods pair image by image.

- Orders are not extra data: a method whose orders give identical images would otherwise look three times as
  sure. Each sample's score is averaged over the orders first, then the samples are resampled.
- The resampling is stratified per concept (per pair for the multi-concept score): the benchmark's average is
  the mean of per-concept means, and each resample keeps every concept with its own number of images.
- Intervals are percentile intervals of 2000 resamples drawn from a fixed seed, so a report is reproducible.
- Forgetting uses only the samples common to every row (the last row may have more images than the others), and
  one resample of them serves every row and every order, as the statistic itself pairs rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fl2t.metrics import CLASS

RESAMPLES = 2000
SEED = 0
METRICS = ("nia", "ia", "ca", "ta", "dino")  # the per-image scores of a task file
REFERENCES = ("fl2t", "lookup")  # the methods every other is compared with, when they ran
COMPARED = ("nia", "ca", "multi", "multi_presence")
FORGETTING = ("nia", "ia", "ca")

Tasks = list[dict[str, Any]]  # one order's task files, in task order
Samples = dict[str, dict[int, float]]  # concept (or pair) -> seed -> score


def interval(
    groups: Sequence[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, list[float]] | None:
    """The mean of the groups' means and its 95% bootstrap interval, resampling within each group (stratified).
    None when there is no value."""
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    boot = np.zeros(resamples)
    for g in groups:
        boot += g[rng.integers(0, len(g), (resamples, len(g)))].mean(axis=1)
    boot /= len(groups)
    point = float(np.mean([g.mean() for g in groups]))
    return point, [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def has_samples(runs: Sequence[Tasks]) -> bool:
    """Every task file of every order keeps per-image scores (a run made before they were kept does not)."""
    return all(
        "samples" in scores for tasks in runs for task in tasks for name, scores in task.items() if name[0] != "_"
    )


def final_samples(runs: Sequence[Tasks], metric: str) -> Samples:
    """Per concept, seed -> the metric of that image in the last row, averaged over the orders that have it."""
    values: dict[str, dict[int, list[float]]] = {}
    for tasks in runs:
        for name, scores in tasks[-1].items():
            s = scores.get("samples") if name[0] != "_" else None
            if s and s.get(metric) is not None:
                for seed, v in zip(s["seed"], s[metric]):
                    values.setdefault(name, {}).setdefault(seed, []).append(v)
    return {name: {seed: float(np.mean(v)) for seed, v in by_seed.items()} for name, by_seed in values.items()}


def multi_samples(runs: Sequence[Tasks], score: str = "nia") -> Samples:
    """Per concept pair, seed -> a multi-concept score of that image (nia, ta or presence), averaged over the
    orders; empty where the task files do not hold that score."""
    values: dict[str, dict[int, list[float]]] = {}
    for tasks in runs:
        for pair, s in (tasks[-1].get("_multi_samples") or {}).items():
            for seed, v in zip(s["seed"], s.get(score) or []):
                values.setdefault(pair, {}).setdefault(seed, []).append(v)
    return {pair: {seed: float(np.mean(v)) for seed, v in by_seed.items()} for pair, by_seed in values.items()}


def mean_interval(samples: Samples) -> list[float] | None:
    """The 95% interval of the mean of per-concept (per-pair) means."""
    got = interval([np.array(list(by_seed.values())) for by_seed in samples.values()])
    return None if got is None else got[1]


def paired(a: Samples, b: Samples) -> dict[str, Any] | None:
    """a − b over the samples both have: the mean difference (of per-concept means) and its 95% interval."""
    both = sorted(a.keys() & b.keys())  # sorted: the same resamples in every process
    diffs = [np.array([a[k][s] - b[k][s] for s in sorted(a[k].keys() & b[k].keys())]) for k in both]
    got = interval(diffs)
    if got is None:
        return None
    return {"diff": got[0], "ci": got[1], "samples": int(sum(len(d) for d in diffs))}


def common_rows(runs: Sequence[Tasks], orders: Sequence[Sequence[str]], metric: str) -> list[dict[str, np.ndarray]]:
    """Per order, per concept: its rows (from its own task on) × the samples common to every row of every order,
    as an array (rows, n); the seeds in ascending order."""
    common: dict[str, set[int]] = {}
    for tasks, order in zip(runs, orders):
        for t, task in enumerate(tasks):
            for name in order[: t + 1]:
                seeds = set(task[name]["samples"]["seed"])
                common[name] = common[name] & seeds if name in common else seeds
    out = []
    for tasks, order in zip(runs, orders):
        rows = {}
        for i, name in enumerate(order):
            keep = sorted(common[name])
            per_row = []
            for task in tasks[i:]:
                s = task[name]["samples"]
                by_seed = dict(zip(s["seed"], s[metric]))
                per_row.append([by_seed[seed] for seed in keep])
            rows[name] = np.array(per_row, dtype=float)
        out.append(rows)
    return out


def _forgetting(
    rows: list[dict[str, np.ndarray]], orders: Sequence[Sequence[str]], index: dict[str, np.ndarray]
) -> np.ndarray:
    """Average forgetting, mean_i (max_{t<G} R[t][i] − R[G][i]) over the concepts learned before the last task,
    averaged over the orders, with R[t][i] the mean over the samples `index[concept]` (resamples, n) picks:
    (resamples,)."""
    per_order = []
    for order_rows, order in zip(rows, orders):
        drops = []
        for name in order[:-1]:  # the last task's concept cannot be forgotten yet
            R = order_rows[name][:, index[name]].mean(axis=-1)  # (rows, resamples)
            drops.append(R[:-1].max(axis=0) - R[-1])
        per_order.append(np.mean(drops, axis=0) if drops else np.zeros(len(next(iter(index.values())))))
    return np.mean(per_order, axis=0)


def forgetting(runs: Sequence[Tasks], orders: Sequence[Sequence[str]], metric: str) -> float:
    """Average forgetting over the orders, on the samples common to every row."""
    rows = common_rows(runs, orders, metric)
    return float(_forgetting(rows, orders, {name: np.arange(r.shape[1])[None] for name, r in rows[0].items()})[0])


def forgetting_interval(
    runs: Sequence[Tasks], orders: Sequence[Sequence[str]], metric: str, resamples: int = RESAMPLES, seed: int = SEED
) -> list[float]:
    """The 95% interval of `forgetting`: each resample draws one set of samples per concept and uses it in every
    row and every order."""
    rows = common_rows(runs, orders, metric)
    rng = np.random.default_rng(seed)
    draws = {name: rng.integers(0, r.shape[1], (resamples, r.shape[1])) for name, r in sorted(rows[0].items())}
    boot = _forgetting(rows, orders, draws)
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def confusion(runs: Sequence[Tasks], names: Sequence[str]) -> dict[str, Any]:
    """For each concept's images in the last row (pooled over orders), the share nearest each learned concept's
    references and the base class (`fl2t.metrics.nearest_concepts`). Rows: concepts; columns: concepts + class."""
    columns = [*names, CLASS]
    rows = {}
    for name in names:
        labels = [label for tasks in runs for label in tasks[-1][name]["samples"]["label"]]
        rows[name] = [labels.count(c) / len(labels) for c in columns]
    return {"columns": columns, "rows": rows}


def method_stats(runs: Sequence[Tasks], orders: Sequence[Sequence[str]], names: Sequence[str]) -> dict[str, Any]:
    """A method's intervals and confusion matrix from its task files (one list per order); empty for a run whose
    task files keep no per-image scores."""
    if not has_samples(runs):
        return {}
    average_95, per_concept_95 = {}, {}
    for metric in METRICS:
        samples = final_samples(runs, metric)
        if samples:
            average_95[metric] = mean_interval(samples)
            for name, by_seed in samples.items():
                got = interval([np.array(list(by_seed.values()))])
                per_concept_95.setdefault(name, {})[metric] = got[1] if got else None
    multi, presence = multi_samples(runs), multi_samples(runs, "presence")
    return {
        "samples": {name: len(by_seed) for name, by_seed in final_samples(runs, "nia").items()},
        "average_95": average_95,
        "per_concept_95": per_concept_95,
        "forgetting_95": {m: forgetting_interval(runs, orders, m) for m in FORGETTING},
        "multi_95": mean_interval(multi) if multi else None,
        "multi_presence_95": mean_interval(presence) if presence else None,
        "confusion": confusion(runs, names),
    }


def comparisons(runs: dict[str, Sequence[Tasks]]) -> list[dict[str, Any]]:
    """Every method against fl2t and against lookup (those that ran), paired over the same samples: the mean
    difference reference − method of the final nIA, CA and multi-concept score, with its 95% interval.
    Methods without per-image scores are left out."""
    with_samples = {m: r for m, r in runs.items() if has_samples(r)}
    scores = {
        m: {
            **{k: final_samples(r, k) for k in ("nia", "ca")},
            "multi": multi_samples(r),
            "multi_presence": multi_samples(r, "presence"),
        }
        for m, r in with_samples.items()
    }
    out, seen = [], set()
    for ref in REFERENCES:
        if ref not in scores:
            continue
        for other in scores:
            if other == ref or frozenset((ref, other)) in seen:
                continue
            seen.add(frozenset((ref, other)))
            for metric in COMPARED:
                got = paired(scores[ref][metric], scores[other][metric])
                if got is not None:
                    out.append({"a": ref, "b": other, "metric": metric, **got})
    return out
