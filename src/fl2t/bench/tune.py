"""`fl2t bench tune`: each method's main settings chosen on the tiny world's tuning-only concepts.

A tuning config (benchmarks/tune.yaml) is a benchmark config over concepts no evaluated benchmark uses
(`fl2t.world.concepts.TUNING_CONCEPTS`), with a grid of values per method:

    grid:
      ewc: {ewc_lambda: [1.0e+4, 1.0e+5, 1.0e+6, 1.0e+7]}
      fl2t: {consolidate.lambda_base: [0.1, 0.5, 2.0]}

A key `consolidate.<x>` is the Step-2 setting x (bench/variants.py), any other the method's own setting (its
`settings_model`); with two keys every combination is a point. Each point is a variant named
`<method>@<key>=<value>[,<key>=<value>]`, and every point runs in ONE `fl2t bench continual` run, so the experts
learned alone are learned once for all points that use them and a stopped run resumes where it stopped.

The rule: per method, the point with the best final average normalised IA over the tuning concepts (mean over the
orders) is chosen; ties (equal to 1e-9) go to the lower average nIA forgetting, then to the earlier point in the
grid. `tuned.yaml` in the run folder holds the chosen values as a benchmark config's sections, ready to paste into
tiny10.yaml: `methods:` (each method's own settings) and `consolidate:` (Step-2 settings, which fl2t uses).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fl2t.bench.continual import make_config, read_config, run_continual
from fl2t.errors import Fl2tError
from fl2t.files import atomic_write_text

TIE = 1e-9  # nIA differences below this are ties
RULE = "chosen: the best final average nIA per method; ties: the lower nIA forgetting, then the earlier point"


def grid_variants(grid: Any, source: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """method -> {point name: its variant (as a config's `variants:` entry)}, in grid order."""
    from fl2t.methods import METHODS

    if not isinstance(grid, dict) or not grid:
        raise Fl2tError(
            f"{source}: no grid: a tuning config (like the built-in tune) gives each method's settings to try, "
            "e.g. grid: {ewc: {ewc_lambda: [1.0e+4, 1.0e+6]}}"
        )
    out: dict[str, dict[str, dict[str, Any]]] = {}
    owners: dict[str, str] = {}  # a Step-2 key -> the method whose grid tunes it (tuned.yaml has one section)
    for method, settings in grid.items():
        if method not in METHODS:
            raise Fl2tError(f"{source}: grid: no method named {method!r}; choose from {', '.join(METHODS)}")
        if not isinstance(settings, dict) or not settings:
            raise Fl2tError(f"{source}: grid: {method}: a mapping of setting -> [values]")
        for key, values in settings.items():
            if not isinstance(values, list) or not values:
                raise Fl2tError(f"{source}: grid: {method}: {key}: a list of values to try")
            if key.startswith("consolidate."):
                if owners.setdefault(key, method) != method:
                    raise Fl2tError(f"{source}: grid: {key} is tuned for {owners[key]} and {method}; tune it once")
            elif "." in key:
                raise Fl2tError(f"{source}: grid: {method}: {key}: a setting of the method, or consolidate.<setting>")
        points = {}
        for values in itertools.product(*settings.values()):
            point = dict(zip(settings, values))
            name = f"{method}@" + ",".join(f"{k.removeprefix('consolidate.')}={_text(v)}" for k, v in point.items())
            if name in points:
                raise Fl2tError(f"{source}: grid: {method}: two points read as {name}; give distinct values")
            own = {k: v for k, v in point.items() if not k.startswith("consolidate.")}
            step2 = {k.removeprefix("consolidate."): v for k, v in point.items() if k.startswith("consolidate.")}
            points[name] = {"method": method, "settings": own, "consolidate": step2}
        out[method] = points
    return out


def chosen(results: dict[str, Any], points: dict[str, list[str]]) -> dict[str, str]:
    """method -> its chosen point (RULE): the best final average nIA, ties to the lower nIA forgetting, then the
    earlier point."""

    def rank(row: str) -> tuple[float, float]:
        r = results["methods"][row]
        forgetting = r["forgetting"].get("nia")
        return -round(r["average"]["nia"] / TIE), math.inf if forgetting is None else round(forgetting / TIE)

    return {method: min(rows, key=rank) for method, rows in points.items()}  # min keeps the first of equals


def run_tune(
    config: str | Path,
    methods: list[str] | None,
    out: Path,
    progress: Callable[[], Any] | None,
    say: Callable[[str], None],
) -> dict[str, Any] | None:
    """Run every grid point of `methods` (default: every method of the grid) as one benchmark run, choose per method
    (RULE), print the table and write `tuned.yaml` into the run folder (the methods of this call: run without
    `methods` for all of them; finished points are not run again). Returns {"results", "chosen", "tuned",
    "path"}, or None for a worker that leaves the report to another (under torchrun)."""
    from rich.console import Console
    from rich.table import Table

    source, raw = read_config(config)
    grid = grid_variants(raw.pop("grid", None), source)
    methods = methods or list(grid)
    missing = [m for m in methods if m not in grid]
    if missing:
        raise Fl2tError(f"{source}: no grid for {', '.join(missing)}; its grid has: {', '.join(grid)}")
    given = raw.get("variants") or {}
    clash = sorted(set(given) & {p for points in grid.values() for p in points})
    if clash:
        raise Fl2tError(f"{source}: variants {', '.join(clash)} have the names of grid points; rename them")
    # Every point of the grid is a variant, whichever are run now: the run's record stays the same between calls.
    raw["variants"] = {**given, **{name: v for points in grid.values() for name, v in points.items()}}
    cfg = make_config(source, raw)
    points = {m: list(grid[m]) for m in methods}
    results = run_continual(cfg, [p for m in methods for p in points[m]], out, progress, say)
    if results is None:
        return None
    choice = chosen(results, points)
    tuned: dict[str, Any] = {"methods": {}, "consolidate": {}}
    for method, row in choice.items():
        v = cfg.variants[row]
        if v.settings:
            tuned["methods"][method] = dict(v.settings)
        tuned["consolidate"].update(v.consolidate)
    tuned = {k: v for k, v in tuned.items() if v}
    path = Path(out) / cfg.name / "tuned.yaml"
    notes = [
        f"# fl2t bench tune --config {config}: {RULE}.",
        "# Measured on the tuning concepts " + ", ".join(results["concepts"]) + ":",
        *(f"#   {row}: nIA {_f(results['methods'][row]['average']['nia'])}" for row in choice.values()),
        "# Paste these sections into tiny10.yaml (`consolidate:` holds Step-2 settings, which fl2t uses).",
    ]
    atomic_write_text(path, "\n".join(notes) + "\n" + yaml.safe_dump(tuned, sort_keys=False))

    table = Table(title=f"{cfg.name}: {RULE}")
    for h in ("method", "value", "nIA", "CA", "forget nIA", "chosen"):
        table.add_column(h, justify="left" if h in ("method", "value") else "right")
    for method, rows in points.items():
        for row in rows:
            r = results["methods"][row]
            value = row.split("@", 1)[1]
            star = "*" if choice[method] == row else ""
            table.add_row(
                method, value, _f(r["average"]["nia"]), _f(r["average"]["ca"]), _f(r["forgetting"]["nia"]), star
            )
    Console(width=120).print(table)
    print(f"tuned settings: {path}")
    return {"results": results, "chosen": choice, "tuned": tuned, "path": path}


def _text(value: Any) -> str:
    """A grid value as it reads in a point's name: 1e6, 2.5e-4, 0.75, 300, true."""
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, float):
        return str(value)
    if value and not 1e-3 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.6e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.6g}"


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"
