"""``python -m trainer efficiency`` on a tiny project (40 training images): per fraction, per init
and per seed rows whose means, sds and paired differences recompute from the runs' own files, a
per-fraction budget with its schedule scaled, the plot, reuse of every finished run on a second
call, and one-line refusals of fractions with too few labelled images."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pipeline.cli import UserError
from tests.trainer.helpers import run_cli
from tests.trainer.tiny_project import pretrain, sets, write_project
from trainer.config import load_config
from trainer.experiments.efficiency import budgets, parse_fracs
from trainer.stages.coco_metrics import METRIC_NAMES

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
# finetune.iters 2 with a step at 1; fraction 0.5 gets twice the budget, so its schedule doubles.
BUDGET = (
    "finetune.iters=2",
    "finetune.lr_steps=[1]",
    "efficiency.fracs=[0.25, 0.5]",
    "efficiency.iters=[2, 4]",
    "maskrcnn.warmup_iters=1",
    "maskrcnn.lr_steps=[]",
)


def _efficiency(toml: Path, *extra: str):
    return run_cli("efficiency", "--config", str(toml), *sets(*BUDGET), *extra)


def test_efficiency_rows_recompute_from_the_runs_and_are_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = write_project(tmp_path, num_train=40)
    pretrain(toml, tmp_path / "runs" / "tiny" / "pretrain", 1)
    args = ("--fracs", "0.25,0.5", "--seeds", "0,1", "--reference", "maskrcnn")
    code, out, err = _efficiency(toml, *args)
    assert code == 0, err
    folder = Path("runs/tiny/efficiency")
    results = json.loads((folder / "results.json").read_text())
    assert [f["frac"] for f in results["fractions"]] == [0.25, 0.5]
    assert results["settings"]["iters"] == {"0.25": 2, "0.5": 4}
    images = {}
    for f, count, iters, steps in zip(results["fractions"], (10, 20), (2, 4), ([1], [2])):
        assert f["labelled_images"] == count and f["iters"] == iters
        by = {}
        for r in f["runs"]:
            out_dir = Path(r["out"])
            assert out_dir == folder / f"frac-{f['frac']:g}" / f"{r['row']}-seed{r['seed']}"
            final = json.loads((out_dir / "metrics.json").read_text())["final"]
            assert (r["AP"], r["AP50"]) == (final["AP"], final["AP50"])
            split = json.loads((out_dir / "split.json").read_text())["images"]
            assert r["labelled_images"] == len(split) == count
            images.setdefault(f["frac"], {im["id"] for im in split})
            assert {im["id"] for im in split} == images[f["frac"]]  # one split per fraction
            cfg = load_config(out_dir / "config.toml")
            assert cfg.finetune.iters == r["iterations"] == iters
            assert cfg.finetune.lr_steps == steps  # the budget's schedule keeps its shape
            if r["row"] == "maskrcnn":
                assert cfg.maskrcnn.warmup_iters == iters // 2
            by[(r["row"], r["seed"])] = final
        assert sorted(by) == [(row, s) for row in ("baseline", "maskrcnn", "sp") for s in (0, 1)]
        for row in ("sp", "baseline", "maskrcnn"):
            for m in ("AP", "AP50"):
                values = [by[(row, s)][m] for s in (0, 1)]
                stat = f["metrics"][row][m]
                assert stat["mean"] == pytest.approx(statistics.mean(values))
                assert stat["sd"] == pytest.approx(statistics.stdev(values))
        for other in ("baseline", "maskrcnn"):
            diff = f["differences"][f"sp - {other}"]
            deltas = [by[("sp", s)]["AP"] - by[(other, s)]["AP"] for s in (0, 1)]
            assert [p["seed"] for p in diff["pairs"]] == [0, 1]
            assert [p["AP"] for p in diff["pairs"]] == pytest.approx(deltas)
            assert diff["AP"]["mean"] == pytest.approx(statistics.mean(deltas))
            assert diff["AP"]["sd"] == pytest.approx(statistics.stdev(deltas))
        # Each fraction folder is a compare folder with compare's own report.
        assert (folder / f"frac-{f['frac']:g}" / "ap_vs_iter.png").is_file()
    assert images[0.25] < images[0.5]  # the seeded splits nest
    text = (folder / "results.md").read_text()
    assert "| 0.25 | 10 | 2 |" in text and "| 0.5 | 20 | 4 |" in text
    assert "SP − baseline (paired)" in text and "SP − maskrcnn (paired)" in text
    assert "| 0.25 | 10 | 2 |" in out and "runs/tiny/efficiency/results.md" in out
    assert (folder / "efficiency.png").stat().st_size > 0

    # Again: every finished run is reused, none is trained; the report is the same.
    before = {r["out"]: Path(r["out"], "metrics.json").stat().st_mtime_ns for f in
              results["fractions"] for r in f["runs"]}  # fmt: skip
    code, _, err = _efficiency(toml, *args)
    assert code == 0, err
    assert err.count("reusing the finished run") == 12
    assert {o: Path(o, "metrics.json").stat().st_mtime_ns for o in before} == before
    again = json.loads((folder / "results.json").read_text())
    assert again["fractions"] == results["fractions"]


def test_too_few_labelled_images_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = write_project(tmp_path, num_train=40)
    code, _, err = _efficiency(toml, "--fracs", "0.2,0.5", "--iters", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "fraction 0.2 gives 8 labelled images" in err and "at least 10" in err
    assert not Path("runs").exists()  # refused before anything trained
    for bad, words in (("0.5,0.25", "increasing"), ("0.25,0.25", "increasing"), ("0,0.5", "(0, 1]"),
                       ("1.5", "(0, 1]"), ("a", "numbers")):  # fmt: skip
        code, _, err = _efficiency(toml, "--fracs", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (bad, err)


def test_budgets_per_fraction():
    cfg = load_config(DEMO, ["efficiency.fracs=[0.05, 0.1]", "efficiency.iters=[300, 500]"])
    assert budgets(cfg, [0.05, 0.1], None) == {0.05: 300, 0.1: 500}
    assert budgets(cfg, [0.1], 7) == {0.1: 7}
    with pytest.raises(UserError, match="no budget for fraction 0.2"):
        budgets(cfg, [0.1, 0.2], None)
    # Without per-fraction budgets every fraction gets finetune.iters.
    no_budgets = load_config(DEMO, ["efficiency.iters=[]"])
    assert budgets(no_budgets, [0.05, 0.2], None) == {0.05: 500, 0.2: 500}
    assert parse_fracs(None, cfg.efficiency.fracs) == [0.05, 0.1]
    # The config section is checked when loaded, naming the key.
    code, _, err = run_cli("efficiency", "--config", str(DEMO), "--set", "efficiency.iters=[1]")
    assert code == 2 and "efficiency.iters must hold one budget per fraction" in err
    code, _, err = run_cli(
        "efficiency", "--config", str(DEMO), "--set", "efficiency.fracs=[0.2, 0.1]"
    )
    assert code == 2 and "efficiency.fracs must be increasing" in err


def _records(tmp: Path, frac: float, aps: dict[str, dict[int, float]], count: int) -> dict:
    """compare's result for one fraction, made up: run folders with a split.json of ``count``
    images and the given final AP per row and seed (AP50 = 2 AP)."""
    rows = {}
    for row, by_seed in aps.items():
        for seed, ap in by_seed.items():
            out = tmp / f"frac-{frac:g}" / f"{row}-seed{seed}"
            out.mkdir(parents=True)
            (out / "split.json").write_text(
                json.dumps({"images": [{"id": i} for i in range(count)]})
            )
            final = {**dict.fromkeys(METRIC_NAMES, 0.0), "AP": ap, "AP50": 2 * ap}
            record = {"seed": seed, "out": str(out), "iterations": 5, "init_sha256": None,
                      "final": final}  # fmt: skip
            rows.setdefault(row, []).append(record)
    folder = tmp / f"frac-{frac:g}"
    return {"rows": rows, "results_json": str(folder / "results.json"),
            "results_md": str(folder / "results.md")}  # fmt: skip


def test_fraction_entry_pairs_by_seed_and_plots(tmp_path):
    from trainer.experiments.efficiency_report import fraction_entry, write_efficiency

    # SP's runs listed in another seed order than the baseline's: pairs still match seeds.
    small = _records(tmp_path, 0.05, {"sp": {1: 0.30, 0: 0.10}, "baseline": {0: 0.05, 1: 0.10}}, 20)
    large = _records(tmp_path, 0.1, {"sp": {0: 0.40, 1: 0.50}, "baseline": {0: 0.35, 1: 0.35}}, 40)
    entries = [fraction_entry(0.05, 5, small), fraction_entry(0.1, 5, large)]
    diff = entries[0]["differences"]["sp - baseline"]
    assert {p["seed"]: p["AP"] for p in diff["pairs"]} == pytest.approx({0: 0.05, 1: 0.20})
    assert {p["seed"]: p["AP50"] for p in diff["pairs"]} == pytest.approx({0: 0.10, 1: 0.40})
    assert diff["AP"]["mean"] == pytest.approx(0.125)
    assert diff["AP"]["sd"] == pytest.approx(statistics.stdev([0.05, 0.20]))
    assert entries[0]["metrics"]["sp"]["AP"]["mean"] == pytest.approx(0.20)
    assert entries[1]["metrics"]["baseline"]["AP"]["sd"] == pytest.approx(0.0)
    assert [e["labelled_images"] for e in entries] == [20, 40]
    labels = {"sp": "Saliency Prompt", "baseline": "baseline"}
    result = write_efficiency(
        tmp_path / "eff", title="t", intro=[], fractions=entries, labels=labels, settings={}
    )
    assert "| 0.05 | 20 | 5 | 20.0 ± 14.1 | 7.5 ± 3.5 | +12.5 ± 10.6 |" in result["table"]
    assert "| 0.1 | 40 | 5 | 45.0 ± 7.1 | 35.0 ± 0.0 | +10.0 ± 7.1 |" in result["table"]
    assert Path(result["png"]).stat().st_size > 0
