"""The benchmark's report: `report.md`, a self-contained `report.html` (images inlined), matplotlib PNGs of the
forgetting curves, R heat maps and confusion matrices; a summary table whose means carry 95% bootstrap intervals
(bench/stats.py), the paired comparisons in words (`reading`), and the paper's per-concept columns (V1..VG) as a
table of their own, so that neither is wider than a page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

SUMMARY = (("nia", "nIA"), ("ca", "CA"), ("ta", "TA"), ("dino", "DINO"))
VERDICT = {1: "beats", -1: "is below", 0: "no difference shown"}


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(v: float | None, ci: list[float] | None) -> str:
    """A mean and half the width of its 95% interval, compactly: '0.422±.018'; '0.422±–' without one."""
    if v is None:
        return "–"
    half = "–" if ci is None else f"{(ci[1] - ci[0]) / 2:.3f}".removeprefix("0")
    return f"{v:.3f}±{half}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The per-concept columns (named) and the summary columns side by side: the whole table in one, for a view
    that scrolls (the browser UI). The report and the console print the two tables apart, to fit a page."""
    concepts, summary = concept_table(results, named=True), summary_table(results)
    return concepts[0] + summary[0][1:], [c + s[1:] for c, s in zip(concepts[1], summary[1])]


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The summary table, header and rows: per method the final row's averages with their intervals (nIA, CA, TA,
    DINO when measured, fidelity when measured), forgetting (nIA, CA), the multi-concept score and the spread of
    the final average over orders. The per-concept columns are `concept_table`."""
    methods = results["methods"].values()
    columns = [(k, c) for k, c in SUMMARY if any(r["average"].get(k) is not None for r in methods)]
    fidelity = any(r["average"].get("fidelity") is not None for r in methods)
    header = ["method", *[c for _, c in columns], *(["fidelity"] if fidelity else [])]
    presence = any(r.get("multi_presence") is not None for r in methods)
    header += ["forget nIA", "forget CA", "multi nIA", *(["multi both"] if presence else []), "order spread"]
    rows = []
    for method, r in results["methods"].items():
        ci, forget_ci = r.get("average_95") or {}, r.get("forgetting_95") or {}
        rows.append(
            [
                method,
                *[_ci(r["average"][k], ci.get(k)) for k, _ in columns],
                *([_f(r["average"].get("fidelity"))] if fidelity else []),
                _ci(r["forgetting"]["nia"], forget_ci.get("nia")),
                _ci(r["forgetting"]["ca"], forget_ci.get("ca")),
                _ci(r["multi"], r.get("multi_95")) if r["multi"] is not None else "–",
                *([_ci(r.get("multi_presence"), r.get("multi_presence_95"))] if presence else []),
                _f(r["order_spread"], 4),
            ]
        )
    return header, rows


def concept_table(results: dict, named: bool = False) -> tuple[list[str], list[list[str]]]:
    """The per-concept table, header and rows: per method the final normalised IA of each concept (V1..VG, in the
    listed order, averaged over orders); `named`: "V1 stripestar" in the header (else a legend says it)."""
    names = results["concepts"]
    header = ["method", *[f"V{i + 1}" + (f" {n}" if named else "") for i, n in enumerate(names)]]
    rows = [[m, *[_f(r["per_concept"][n]["nia"], 2) for n in names]] for m, r in results["methods"].items()]
    return header, rows


def summary_notes(results: dict) -> list[str]:
    """What the summary table's numbers are."""
    counts = sorted({n for r in results["methods"].values() for n in (r.get("samples") or {}).values()})
    per_concept = f" ({'/'.join(map(str, counts))} per concept)" if counts else ""
    older = [m for m, r in results["methods"].items() if not r.get("average_95")]
    return [
        "nIA, CA, TA, DINO: the final row's averages (the mean of per-concept means), averaged over orders. "
        f"±: half the width of the 95% bootstrap interval over the (concept, prompt, seed) samples{per_concept}, "
        "each averaged over orders first (orders are not extra data), resampled within each concept; the intervals "
        "themselves are in results.json. forget: average forgetting, mean_i (max_{t<G} R[t][i] − R[G][i]), on the "
        "samples common to every row. multi nIA: two concepts in one prompt, normalised IA against each concept's "
        "references, averaged over pairs; multi both (tiny world): the share of those images where the world's "
        "presence score finds both concepts. order spread: max − min of the final average nIA over orders."
        + (f" ±–: no per-image scores ({', '.join(older)}: made before they were kept)." if older else "")
    ]


def concept_notes(results: dict) -> list[str]:
    """The per-concept table's legend and the size of its intervals."""
    names = results["concepts"]
    halves = [
        ((ci["nia"][1] - ci["nia"][0]) / 2, method, name)
        for method, r in results["methods"].items()
        for name, ci in (r.get("per_concept_95") or {}).items()
        if ci.get("nia")
    ]
    legend = ", ".join(f"V{i + 1} {n}" for i, n in enumerate(names))
    lines = [
        f"Final normalised IA per concept (IA divided by the references' own mean IA), averaged over orders: {legend}."
    ]
    if halves:
        width, method, name = max(halves)
        lines.append(
            f"Their 95% intervals (results.json `per_concept_95`) are ±{float(np.median([h[0] for h in halves])):.3f} "
            f"wide at the median, ±{width:.3f} at most ({method}, {name})."
        )
    return lines


def reading(results: dict) -> list[str]:
    """The paired comparisons in words, one line per pair of methods: each method against fl2t and against lookup
    (those that ran), the mean difference of the final nIA, CA and multi-concept score over the same samples, with
    its 95% interval; "beats" or "is below" only where the interval excludes 0."""
    comparisons = results.get("comparisons") or []
    if not comparisons:
        if any(m in results["methods"] for m in ("fl2t", "lookup")):
            return ["No paired comparison: the task files keep no per-image scores (a run made before they were kept)."]
        return []
    lines = [
        "Paired bootstrap over the same (concept, prompt, seed) samples (each averaged over orders first), 95% "
        "intervals; a method beats another, or is below it, only where the interval of the difference excludes 0."
    ]
    pairs: dict[tuple[str, str], list[str]] = {}
    label = {"nia": "nIA", "ca": "CA", "multi": "multi nIA", "multi_presence": "multi both"}
    for c in comparisons:
        lo, hi = c["ci"]
        verdict = VERDICT[(lo > 0) - (hi < 0)]
        verdict = verdict if verdict == VERDICT[0] else f"{c['a']} {verdict} {c['b']}"
        text = f"{label[c['metric']]} {_signed(c['diff'])} ({_signed(lo)} to {_signed(hi)}): {verdict}"
        pairs.setdefault((c["a"], c["b"]), []).append(text)
    lines += [f"{a} − {b}: " + "; ".join(parts) + "." for (a, b), parts in pairs.items()]
    return lines


def _signed(v: float) -> str:
    """'+0.004', '−0.010'; a bound just below 0 stays '−0.000' (the interval excludes 0), rounding noise '+0.000'."""
    return f"{0.0 if abs(v) < 1e-12 else v:+.3f}".replace("-", "−")


def confusion_tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per method (that kept per-image scores) its confusion matrix as a table: for each concept's final-row images
    (pooled over orders), the share nearest each concept's references and the base class."""
    names = results["concepts"]
    header = ["images of", *[f"V{i + 1}" for i in range(len(names))], "class"]
    return [
        (
            method,
            header,
            [[f"V{i + 1} {n}", *[f"{v:.2f}" for v in r["confusion"]["rows"][n]]] for i, n in enumerate(names)],
        )
        for method, r in results["methods"].items()
        if r.get("confusion")
    ]


def confusion_notes() -> list[str]:
    return [
        "Each row: a concept's images in the last row, pooled over orders; each column: the share of them whose "
        "references are nearest (mean cosine), or whose base class images are (class), the rule of CA. The "
        "diagonal is CA; off it, a concept that bleeds into another (a column) or falls back to its class."
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def fidelity_lines(results: dict) -> list[str]:
    """The agreement of fidelity with CA in words (empty when not measured)."""
    a = results.get("fidelity_vs_ca")
    if not a:
        return []
    if a["spearman"] is None or a["auc"] is None:
        return [f"Fidelity against CA: {a['entries']} entries, {a['lost']} with a CA drop: too few to compare.", ""]
    return [
        f"Fidelity against CA over {a['entries']} (method, order, task, concept) entries of the methods other than the "
        f"oracle: Spearman {a['spearman']:.3f} (95% bootstrap interval {a['spearman_95'][0]:.3f} to "
        f"{a['spearman_95'][1]:.3f}); AUC of low fidelity predicting a CA drop of {a['drop']:.2f} or more below the "
        f"oracle's ({a['lost']} such entries): {a['auc']:.3f} ({a['auc_95'][0]:.3f} to {a['auc_95'][1]:.3f}).",
        "",
    ]


COMPUTE_HEADER = ["method", "Step-1 steps", "Step-2 steps", "UNet fwd grad", "UNet fwd no grad", "seconds", "peak MB"]


def compute_note(results: dict) -> str:
    """What the compute table counts, naming the methods charged with the shared experts learned alone."""
    shared = [m for m, r in results["methods"].items() if (r.get("compute") or {}).get("uses_store")]
    return (
        "Compute per method, totals over the tasks of an order averaged over orders (bench/compute.py): optimizer "
        "steps of Step 1 (learn) and Step 2 (consolidate or its equivalent); UNet sample-forwards (a batch of n counts "
        "n) of both steps, with a graph for a backward and without (teachers, anchors, Fisher, class images, fidelity "
        "gate); wall seconds of both; the peak memory of any phase above what was in use when it began. The experts "
        "learned alone are learned once and shared; their whole cost is in the Step 1 of every method that uses them"
        f" ({', '.join(shared) or 'none here'}). Evaluation sampling is not counted. –: not counted (an older run)."
    )


def compute_rows(results: dict) -> list[list[str]]:
    """Per method the compute table's row (COMPUTE_HEADER), from `compute` in the results; – where missing."""

    def n(v: float | None, digits: int = 0) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    rows = []
    for method, r in results["methods"].items():
        c = r.get("compute")
        if c is None:
            rows.append([method, *["–"] * (len(COMPUTE_HEADER) - 1)])
            continue
        total = c["total"]
        rows.append(
            [
                method,
                n(c["step1"]["steps"]),
                n(c["step2"]["steps"]),
                n(total["unet_forwards_grad"]),
                n(total["unet_forwards_nograd"]),
                n(total["seconds"], 1),
                n(total["peak_mb"]),
            ]
        )
    return rows


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, r in results["methods"].items():
        for ax, metric, label in ((axes[0], "nia", "mean normalised IA"), (axes[1], "ca", "mean concept accuracy")):
            curves = [[np.mean([v for v in row if v is not None]) for row in run["R"][metric]] for run in r["runs"]]
            ax.plot(range(1, len(curves[0]) + 1), np.mean(curves, axis=0), marker="o", label=method)
            ax.set_xlabel("task")
            ax.set_ylabel(label + " of learned concepts")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "forgetting.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    for method, r in results["methods"].items():
        R = np.array([[np.nan if v is None else v for v in row] for row in r["runs"][0]["R"]["nia"]])
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        im = ax.imshow(
            R,
            cmap="viridis",
            vmin=np.nanmin(R) if np.isfinite(R).any() else 0,
            vmax=np.nanmax(R) if np.isfinite(R).any() else 1,
        )
        ax.set_xlabel("concept (arrival order)")
        ax.set_ylabel("after task")
        ax.set_title(f"{method}: R[t][i], normalised IA (order 0)", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out / f"R-{method}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    confusions = {m: r["confusion"] for m, r in results["methods"].items() if r.get("confusion")}
    if confusions:  # one panel per method: rows the concepts' images, columns where they land
        cols = min(3, len(confusions))
        rows = -(-len(confusions) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
        for ax, (method, c) in zip(axes.flat, confusions.items()):
            im = ax.imshow(np.array([c["rows"][n] for n in results["concepts"]]), cmap="magma", vmin=0, vmax=1)
            ax.set_xticks(range(len(c["columns"])), [f"V{i + 1}" for i in range(len(c["columns"]) - 1)] + ["class"])
            ax.set_yticks(range(len(results["concepts"])), [f"V{i + 1}" for i in range(len(results["concepts"]))])
            ax.tick_params(labelsize=6)
            ax.set_xlabel("nearest references", fontsize=7)
            ax.set_ylabel("images of", fontsize=7)
            ax.set_title(f"{method}: final row", fontsize=9)
        for ax in axes.flat[len(confusions) :]:
            ax.axis("off")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        paths.append(out / "confusion.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_report(results: dict, folder: Path) -> tuple[Path, Path]:
    header, rows = summary_table(results)
    pngs = plots(results, folder / "plots")
    md = [
        f"# Continual benchmark: {results['name']}",
        "",
        f"Orders: {len(results['orders'])}; concepts in listed order: {', '.join(results['concepts'])}.",
        "",
    ]
    md += [*_md_table(header, rows), "", *summary_notes(results), "", *reading(results), ""]
    md += ["## Per concept", "", *_md_table(*concept_table(results)), "", *concept_notes(results), ""]
    md += [*fidelity_lines(results)]
    confusion = confusion_tables(results)
    if confusion:
        md += ["## Confusion matrices (final row)", "", *confusion_notes(), ""]
        md += [line for method, ch, cr in confusion for line in (f"**{method}**", "", *_md_table(ch, cr), "")]
    compute = compute_rows(results)
    md += ["## Compute", "", *_md_table(COMPUTE_HEADER, compute), "", compute_note(results), ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in pngs]
    grids = sorted(folder.glob("*/order0/grids/*.png"))
    if grids:
        md += ["", "## Samples after the last task (order 0)", ""]
        md += [f"**{g.parts[-4]} · {g.stem}**  ![{g.stem}]({g.relative_to(folder).as_posix()})" for g in grids]
    md_path = folder / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    def img(p: Path) -> str:
        return (
            f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" alt="{html.escape(p.stem)}">'
        )

    h = [
        f"<!doctype html><meta charset='utf-8'><title>fl2t bench: {html.escape(results['name'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "th{background:#eee}td:first-child{text-align:left}img{image-rendering:pixelated;margin:4px}</style>",
        f"<h1>Continual benchmark: {html.escape(results['name'])}</h1>",
        _html_table(header, rows),
        *[f"<p>{html.escape(line)}</p>" for line in summary_notes(results) + reading(results)],
        "<h2>Per concept</h2>",
        _html_table(*concept_table(results)),
        *[f"<p>{html.escape(line)}</p>" for line in concept_notes(results) + fidelity_lines(results) if line],
    ]
    if confusion:
        h += ["<h2>Confusion matrices (final row)</h2>", *[f"<p>{html.escape(line)}</p>" for line in confusion_notes()]]
        h += [f"<h3>{html.escape(method)}</h3>{_html_table(ch, cr)}" for method, ch, cr in confusion]
    h += ["<h2>Compute</h2>", _html_table(COMPUTE_HEADER, compute), f"<p>{html.escape(compute_note(results))}</p>"]
    h += [img(p) for p in pngs]
    if grids:
        h.append("<h2>Samples after the last task (order 0)</h2>")
        h += [f"<div><b>{html.escape(g.parts[-4])} · {html.escape(g.stem)}</b><br>{img(g)}</div>" for g in grids]
    html_path = folder / "report.html"
    html_path.write_text("\n".join(h) + "\n")
    return md_path, html_path
