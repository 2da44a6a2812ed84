"""The label-efficiency report (trainer/experiments/efficiency.py): per fraction, each init's AP
over seeds
and the paired differences, as results.json, one markdown table and the AP-vs-labels plot.

Statistics are trainer/experiments/results.py's: sample sd (n - 1; None with one seed), differences
paired by
fine-tuning seed. Metrics stay fractions in [0, 1] in results.json; the table and plot show
percent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.experiments.results import paired_differences, percent_text, row_metrics

SHOWN = ("AP", "AP50")
SP, BASELINE = "sp", "baseline"


def _pairs(diff: dict[str, Any]) -> dict[str, Any]:
    """paired_differences' result cut to :data:`SHOWN`."""
    pairs = [{"seed": p["seed"], **{m: p[m] for m in SHOWN}} for p in diff["pairs"]]
    return {"pairs": pairs, **{m: diff[m] for m in SHOWN}}


def fraction_entry(frac: float, iters: int, result: dict[str, Any]) -> dict[str, Any]:
    """One fraction's record from compare's result (its "rows" of run records): every run's AP,
    AP50 and labelled images (from the run's own split.json), each row's mean ± sd, and SP minus
    every other row, paired by seed."""
    rows = result["rows"]
    runs = []
    for row, records in rows.items():
        for r in records:
            split = json.loads((Path(r["out"]) / "split.json").read_text())
            runs.append(
                {
                    "row": row,
                    "seed": r["seed"],
                    **{m: r["final"][m] for m in SHOWN},
                    "labelled_images": len(split["images"]),
                    "iterations": r["iterations"],
                    "out": r["out"],
                    "init_sha256": r["init_sha256"],
                }
            )
    metrics = {row: {m: row_metrics(records)[m] for m in SHOWN} for row, records in rows.items()}
    differences = {
        f"{SP} - {row}": _pairs(paired_differences(rows[SP], rows[row]))
        for row in rows
        if row != SP
    }
    return {
        "frac": frac,
        "labelled_images": runs[0]["labelled_images"],
        "iters": iters,
        "folder": str(Path(result["results_json"]).parent),
        "report": result["results_md"],
        "runs": runs,
        "metrics": metrics,
        "differences": differences,
    }


def efficiency_table(fractions: Sequence[dict[str, Any]], labels: dict[str, str]) -> str:
    """| fraction | labelled images | iterations | AP per init | SP - other, paired |."""
    rows = list(fractions[0]["metrics"])
    diffs = list(fractions[0]["differences"])
    head = ["fraction", "labelled images", "iterations", *(labels[r] for r in rows)]
    head += [f"SP − {d.split(' - ')[1]} (paired)" for d in diffs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in fractions:
        cells = [f"{f['frac']:g}", str(f["labelled_images"]), str(f["iters"])]
        cells += [percent_text(f["metrics"][r]["AP"]) for r in rows]
        cells += [percent_text(f["differences"][d]["AP"], signed=True) for d in diffs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_efficiency(
    fractions: Sequence[dict[str, Any]], labels: dict[str, str], png: Path, title: str
) -> Path:
    """Mask AP (percent) against labelled images (log x): one line per init, the mean over
    seeds with the sd as error bars (none with one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [f["labelled_images"] for f in fractions]
    for row in fractions[0]["metrics"]:
        stats = [f["metrics"][row]["AP"] for f in fractions]
        ys = [100 * s["mean"] if s["mean"] is not None else float("nan") for s in stats]
        err = [100 * s["sd"] if s["sd"] is not None else 0.0 for s in stats]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, lw=2, label=labels[row])
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images (log scale)")
    ax.set_ylabel("mask AP (%)")
    ax.set_ylim(bottom=0)  # from zero, as trainer/experiments/results.py's curves
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_efficiency(
    folder: Path,
    *,
    title: str,
    intro: Sequence[str],
    fractions: Sequence[dict[str, Any]],
    labels: dict[str, str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """results.json, results.md and efficiency.png in ``folder``; returns their paths, the
    table and the per-fraction records."""
    from pipeline.atomic_files import write_json, write_text

    folder.mkdir(parents=True, exist_ok=True)
    write_json(
        folder / "results.json",
        {"settings": settings, "labels": labels, "fractions": list(fractions)},
    )
    table = efficiency_table(fractions, labels)
    text = [
        f"# {title}",
        "",
        *intro,
        "",
        "Mask AP in percent (pycocotools, final iteration), mean ± sample sd over the seeds; "
        "SP − other: the difference to the run of the same fine-tuning seed, mean ± sd.",
        "",
        table,
        "",
        "![mask AP against labelled images](efficiency.png)",
        "",
        "Each fraction's compare report (every metric, per-seed pairs, convergence, curves):",
        "",
        *(f"- {f['frac']:g}: `{f['report']}`" for f in fractions),
        "",
    ]
    write_text(folder / "results.md", "\n".join(text))
    png = plot_efficiency(fractions, labels, folder / "efficiency.png", title)
    return {
        "results_json": str(folder / "results.json"),
        "results_md": str(folder / "results.md"),
        "png": str(png),
        "table": table,
        "fractions": list(fractions),
    }


def print_efficiency(result: dict[str, Any]) -> None:
    """The table and where the results are, on stdout."""
    print(result["table"])
    print(f"efficiency: {result['results_md']}, {result['results_json']}, {result['png']}")
