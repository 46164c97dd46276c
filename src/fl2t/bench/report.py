"""The benchmark's report: `report.md`, a self-contained `report.html` (images inlined), matplotlib PNGs of the
forgetting curves and R heat maps, and the table laid out like the paper's (V1..VG, average IA, TA, DINO,
forgetting)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

COLUMNS = (("nia", "nIA"), ("ia", "IA"), ("ta", "TA"), ("dino", "DINO"), ("ca", "CA"))


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per method, the final normalised IA per concept (V1..VG, averaged over orders), the
    averages, forgetting (normalised IA and CA), multi-concept score and the spread over orders."""
    names = results["concepts"]
    columns = _columns(results)
    header = [
        "method",
        *[f"V{i + 1} {n}" for i, n in enumerate(names)],
        *[c for _, c in columns],
        "forget nIA",
        "forget CA",
        "multi nIA",
        "order spread",
    ]
    rows = []
    for method, r in results["methods"].items():
        rows.append(
            [
                method,
                *[_f(r["per_concept"][n]["nia"], 2) for n in names],
                *[_f(r["average"][k]) for k, _ in columns],
                _f(r["forgetting"]["nia"]),
                _f(r["forgetting"]["ca"]),
                _f(r["multi"]),
                _f(r["order_spread"], 4),
            ]
        )
    return header, rows


def _columns(results: dict) -> tuple[tuple[str, str], ...]:
    """The average columns: fidelity too when the run measured it (`fidelity: true`)."""
    measured = any(r["average"].get("fidelity") is not None for r in results["methods"].values())
    return COLUMNS + ((("fidelity", "fidelity"),) if measured else ())


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
    return paths


def write_report(results: dict, folder: Path) -> tuple[Path, Path]:
    header, rows = table_rows(results)
    pngs = plots(results, folder / "plots")
    md = [
        f"# Continual benchmark: {results['name']}",
        "",
        f"Orders: {len(results['orders'])}; concepts in listed order: {', '.join(results['concepts'])}.",
        "",
    ]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [
        "",
        "V columns: final normalised IA per concept (IA divided by the references' own mean IA), averaged over orders.",
        "forget: average forgetting, mean_i (max_{t<G} R[t][i] − R[G][i]); order spread: max − min of the final average nIA over orders.",
        "",
        *fidelity_lines(results),
    ]
    compute = compute_rows(results)
    md += ["## Compute", "", "| " + " | ".join(COMPUTE_HEADER) + " |", "|" + "---|" * len(COMPUTE_HEADER)]
    md += ["| " + " | ".join(r) + " |" for r in compute] + ["", compute_note(results), ""]
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
        f"<h1>Continual benchmark: {html.escape(results['name'])}</h1><table><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in header)
        + "</tr>",
    ]
    h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    h += ["</table><p>V columns: final normalised IA per concept, averaged over orders.</p>"]
    h += ["<h2>Compute</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in COMPUTE_HEADER) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in compute]
    h += [f"</table><p>{html.escape(compute_note(results))}</p>", *[img(p) for p in pngs]]
    if grids:
        h.append("<h2>Samples after the last task (order 0)</h2>")
        h += [f"<div><b>{html.escape(g.parts[-4])} · {html.escape(g.stem)}</b><br>{img(g)}</div>" for g in grids]
    html_path = folder / "report.html"
    html_path.write_text("\n".join(h) + "\n")
    return md_path, html_path
