"""Results over seeds: mean and sd per row, paired differences, convergence, tables and the plot.

``compare`` and ``study`` both hand this module "rows": a row is one way of initialising
fine-tuning (Saliency Prompt, a pre-training variant, the baseline) and holds one run record per
fine-tuning seed (and pre-training seed)::

    {"row", "seed", "pretrain_seed" (None for the baseline), "out", "init", "init_sha256",
     "iterations", "train_seconds", "final": {AP, ..., "iteration"}, "best": {...},
     "curve": [{"iteration", AP, AP50, ...}]}

Metrics stay fractions in [0, 1] here and in results.json (as pycocotools gives them; -1 where it
has no ground truth in an area range, left out of means); the markdown shows percent.

- sd is the sample standard deviation (n - 1), None with one value.
- A paired difference pairs a run with the baseline run of the same fine-tuning seed (same split,
  same budget, same head initialisation and batch order up to what the init changes).
- Convergence (the paper's claim that SP learns faster): the first evaluated iteration at which a
  run's AP reaches the baseline's final AP, against the mean over the baseline's seeds and against
  the same seed's baseline; None ("not reached") when no evaluation does. Only evaluated
  iterations are seen, so the answer is as fine as ``finetune.eval_every``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.stages.coco_metrics import METRIC_NAMES

Run = dict[str, Any]


def mean_sd(values: Sequence[float]) -> dict[str, float | int | None]:
    """{"mean", "sd" (sample, n - 1; None with one value), "n"}; all None with no value."""
    n = len(values)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}


def row_metrics(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Mean and sd of every final metric over a row's runs (pycocotools' -1 left out)."""
    return {m: mean_sd([r["final"][m] for r in runs if r["final"][m] >= 0]) for m in METRIC_NAMES}


def paired_differences(runs: Sequence[Run], baseline: Sequence[Run]) -> dict[str, Any]:
    """run - baseline of the same fine-tuning seed, per pair and as mean and sd per metric.

    A metric that is -1 in either run of a pair gives no difference for that pair."""
    by_seed = {r["seed"]: r for r in baseline}
    pairs = []
    for r in runs:
        base = by_seed.get(r["seed"])
        if base is None:
            continue
        diff = {
            m: r["final"][m] - base["final"][m]
            if r["final"][m] >= 0 and base["final"][m] >= 0
            else None
            for m in METRIC_NAMES
        }
        pairs.append({"seed": r["seed"], "pretrain_seed": r.get("pretrain_seed"), **diff})
    summary = {m: mean_sd([p[m] for p in pairs if p[m] is not None]) for m in METRIC_NAMES}
    return {"pairs": pairs, **summary}


def first_reach(curve: Sequence[dict[str, Any]], target: float) -> int | None:
    """The first evaluated iteration whose AP is >= ``target``, else None."""
    for record in sorted(curve, key=lambda r: r["iteration"]):
        if record["AP"] >= target:
            return int(record["iteration"])
    return None


def convergence(runs: Sequence[Run], baseline: Sequence[Run]) -> dict[str, Any]:
    """When each run first reaches the baseline's final AP (mean over seeds, and same seed)."""
    target = mean_sd([b["final"]["AP"] for b in baseline])["mean"]
    by_seed = {b["seed"]: b["final"]["AP"] for b in baseline}
    per_run = []
    for r in runs:
        same = by_seed.get(r["seed"])
        per_run.append(
            {
                "seed": r["seed"],
                "pretrain_seed": r.get("pretrain_seed"),
                "iterations": r["iterations"],
                "reaches_mean_at": None if target is None else first_reach(r["curve"], target),
                "same_seed_target": same,
                "reaches_same_seed_at": None if same is None else first_reach(r["curve"], same),
            }
        )
    return {"baseline_final_ap_mean": target, "runs": per_run}


def summarise(rows: dict[str, list[Run]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per row: n, metrics (mean/sd), and, for every row but the baseline, the paired
    differences and convergence against ``rows[baseline]``."""
    out = {}
    for key, runs in rows.items():
        entry: dict[str, Any] = {"n": len(runs), "metrics": row_metrics(runs)}
        if key != baseline:
            entry["difference"] = paired_differences(runs, rows[baseline])
            entry["convergence"] = convergence(runs, rows[baseline])
        out[key] = entry
    return out


# --------------------------------------------------------------------------------------------
# Rendering


def percent_text(stat: dict[str, Any], signed: bool = False) -> str:
    """A mean_sd of fractions as "12.3 ± 0.4" percent ("+1.2 ± 0.4" signed; "n/a" empty)."""
    if stat["mean"] is None:
        return "n/a"
    mean = f"{100 * stat['mean']:+.1f}" if signed else f"{100 * stat['mean']:.1f}"
    return mean if stat["sd"] is None else f"{mean} ± {100 * stat['sd']:.1f}"


def _seed_name(run: dict[str, Any]) -> str:
    p = run.get("pretrain_seed")
    return f"{run['seed']}" if p is None else f"{run['seed']} (pre-train {p})"


def metrics_table(summary: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """| run | n | AP | ... | with mean ± sd in percent."""
    head = ["run", "n", *METRIC_NAMES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, entry in summary.items():
        cells = [
            labels[key],
            str(entry["n"]),
            *(percent_text(entry["metrics"][m]) for m in METRIC_NAMES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(summary: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """Every pair's difference to the baseline (AP, AP50, AP75 points), then mean ± sd."""
    shown = ("AP", "AP50", "AP75")
    head = ["run - baseline", "fine-tuning seed", *(f"Δ{m}" for m in shown)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, entry in summary.items():
        diff = entry.get("difference")
        if diff is None:
            continue
        for pair in diff["pairs"]:
            cells = [labels[key], _seed_name(pair)]
            cells += ["n/a" if pair[m] is None else f"{100 * pair[m]:+.1f}" for m in shown]
            lines.append("| " + " | ".join(cells) + " |")
        cells = [f"**{labels[key]}**", "**mean ± sd**"]
        cells += [f"**{percent_text(diff[m], signed=True)}**" for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def convergence_table(summary: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """Per run: the first evaluated iteration reaching the baseline's final AP."""
    head = [
        "run",
        "fine-tuning seed",
        "reaches the mean baseline final AP at",
        "reaches its seed's baseline final AP at",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def at(it: int | None, total: int) -> str:
        return "not reached" if it is None else f"{it} of {total}"

    for key, entry in summary.items():
        conv = entry.get("convergence")
        if conv is None:
            continue
        for r in conv["runs"]:
            same = r["reaches_same_seed_at"] if r["same_seed_target"] is not None else None
            cells = [
                labels[key],
                _seed_name(r),
                at(r["reaches_mean_at"], r["iterations"]),
                at(same, r["iterations"]) if r["same_seed_target"] is not None else "n/a",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(
    rows: dict[str, list[Run]], labels: dict[str, str], png: str | Path, title: str
) -> Path:
    """AP (percent) against iteration: every run's curve (thin) and each row's mean (thick),
    one colour per row, the y axis from zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10")
    for i, (key, runs) in enumerate(rows.items()):
        colour = colours(i % 10)
        for r in runs:
            xs = [c["iteration"] for c in r["curve"]]
            ax.plot(xs, [100 * c["AP"] for c in r["curve"]], color=colour, alpha=0.35, lw=1)
        common = sorted(set.intersection(*({c["iteration"] for c in r["curve"]} for r in runs)))
        means = [
            100 * sum(c["AP"] for r in runs for c in r["curve"] if c["iteration"] == it) / len(runs)
            for it in common
        ]
        ax.plot(common, means, color=colour, lw=2.5, marker="o", label=f"{labels[key]} (mean)")
    ax.set_xlabel("fine-tuning iteration")
    ax.set_ylabel("mask AP (%)")
    ax.set_ylim(bottom=0)  # from zero, so a small absolute gap is not drawn as a large one
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_report(
    folder: str | Path,
    *,
    title: str,
    intro: Sequence[str],
    rows: dict[str, list[Run]],
    labels: dict[str, str],
    baseline: str,
    settings: dict[str, Any],
    plot_rows: Sequence[str] | None = None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """results.json (settings, every run once, the summary), results.md (``extra`` lines at the
    end) and ap_vs_iter.png (``plot_rows``, default all) in ``folder``; returns {"results_json",
    "results_md", "png", "summary", "table", "labels"}."""
    from pipeline.atomic_files import write_json, write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, baseline)
    # A pooled row repeats other rows' runs: each run is listed once, under its first row.
    first: dict[str, Run] = {}
    for key in rows:
        for r in rows[key]:
            first.setdefault(r["out"], r)
    runs = list(first.values())
    record = {"settings": settings, "baseline": baseline, "labels": labels, "summary": summary}
    write_json(folder / "results.json", {**record, "runs": runs})
    table = metrics_table(summary, labels)
    target = next(iter(s for s in summary.values() if "convergence" in s), None)
    target_ap = target["convergence"]["baseline_final_ap_mean"] if target else None
    text = [
        f"# {title}",
        "",
        *intro,
        "",
        "Mask AP in percent (pycocotools, final iteration), mean ± sample sd over the runs of "
        "each row (n).",
        "",
        table,
        "",
        "Paired difference to the baseline run of the same fine-tuning seed, AP points:",
        "",
        difference_table(summary, labels),
        "",
        "Convergence: the first evaluated iteration at which a run's AP reaches the baseline's "
        f"final AP (mean over its seeds: {'n/a' if target_ap is None else f'{100 * target_ap:.1f}'}"
        "; and its own seed's), as fine as the evaluation interval:",
        "",
        convergence_table(summary, labels),
        "",
        "Runs (folder, init, init sha256):",
        "",
        *(
            f"- {labels[r['row']]}, seed {_seed_name(r)}: `{r['out']}` (init `{r['init']}`"
            f"{', sha256 ' + r['init_sha256'][:12] if r['init_sha256'] else ''}; "
            f"{r['train_seconds']:.0f} s)"
            for r in runs
        ),
        "",
        *extra,
    ]
    write_text(folder / "results.md", "\n".join(text))
    shown = {k: rows[k] for k in (plot_rows if plot_rows is not None else rows)}
    png = plot_runs(shown, labels, folder / "ap_vs_iter.png", title)
    return {
        "results_json": str(folder / "results.json"),
        "results_md": str(folder / "results.md"),
        "png": str(png),
        "summary": summary,
        "table": table,
        "labels": labels,
    }
