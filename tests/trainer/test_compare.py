"""``python -m trainer compare`` over seeds on a tiny project: results.json holds every run, and
its means, sds, paired differences and convergence iterations recompute from the runs' own files;
finished runs are reused only with the same settings and init bytes (a re-run pre-training's
"sp" runs are refused)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from pipeline.backbones.weight_files import file_sha256
from tests.trainer.helpers import run_cli
from tests.trainer.tiny_project import pretrain, sets, write_project
from trainer.config import load_config
from trainer.engine.checkpoint import load_checkpoint
from trainer.experiments.results import first_reach, mean_sd, paired_differences
from trainer.stages.coco_metrics import METRIC_NAMES


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = write_project(tmp_path)
    ckpt = pretrain(toml, tmp_path / "runs" / "tiny" / "pretrain", 1)
    return toml, ckpt


def _compare(toml: Path, *extra: str):
    return run_cli("compare", "--config", str(toml), *sets(), "--frac", "0.5", *extra)


def test_compare_over_two_seeds_writes_recomputable_results(project):
    toml, ckpt = project
    code, out, err = _compare(toml, "--iters", "2", "--seeds", "0,1")
    assert code == 0, err
    folder = Path("runs/tiny/compare-0.5")
    results = json.loads((folder / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["row"], r["seed"]) for r in runs) == [
        ("baseline", 0),
        ("baseline", 1),
        ("sp", 0),
        ("sp", 1),
    ]
    assert results["settings"]["seeds"] == [0, 1] and results["settings"]["iters"] == 2
    assert results["settings"]["split_method"] == "seeded"
    for r in runs:
        # Each run lives under the compare's folder and is exactly its own metrics.json.
        assert Path(r["out"]) == folder / f"{r['row']}-seed{r['seed']}"
        metrics = json.loads((Path(r["out"]) / "metrics.json").read_text())
        assert r["final"] == metrics["final"] and r["init_sha256"] == metrics["init_sha256"]
        assert [c["iteration"] for c in r["curve"]] == [1, 2]  # per-eval metrics
        assert load_config(Path(r["out"]) / "config.toml").finetune.seed == r["seed"]
    sha = {r["row"]: r["init_sha256"] for r in runs}
    assert sha == {"sp": file_sha256(ckpt), "baseline": None}
    # The seed is the fine-tuning seed only: same split, other batch order / heads.
    splits = [json.loads((Path(r["out"]) / "split.json").read_text())["images"] for r in runs]
    assert all(s == splits[0] for s in splits)

    # Means, sample sds and paired differences, recomputed from the runs.
    by = {(r["row"], r["seed"]): r["final"] for r in runs}
    summary = results["summary"]
    for row in ("sp", "baseline"):
        ap = [by[(row, s)]["AP"] for s in (0, 1)]
        assert summary[row]["metrics"]["AP"]["mean"] == pytest.approx(statistics.mean(ap))
        assert summary[row]["metrics"]["AP"]["sd"] == pytest.approx(statistics.stdev(ap))
    diff = summary["sp"]["difference"]
    for pair in diff["pairs"]:
        for m in METRIC_NAMES:
            sp, base = by[("sp", pair["seed"])][m], by[("baseline", pair["seed"])][m]
            expected = sp - base if sp >= 0 and base >= 0 else None
            assert pair[m] == pytest.approx(expected)
    deltas = [p["AP"] for p in diff["pairs"]]
    assert diff["AP"]["mean"] == pytest.approx(statistics.mean(deltas))
    assert diff["AP"]["sd"] == pytest.approx(statistics.stdev(deltas))
    # Convergence against the mean baseline final AP and against the same seed's.
    conv = summary["sp"]["convergence"]
    target = statistics.mean(by[("baseline", s)]["AP"] for s in (0, 1))
    assert conv["baseline_final_ap_mean"] == pytest.approx(target)
    for entry in conv["runs"]:
        curve = next(r["curve"] for r in runs if (r["row"], r["seed"]) == ("sp", entry["seed"]))
        assert entry["reaches_mean_at"] == first_reach(curve, target)
    text = (folder / "results.md").read_text()
    assert "| Saliency Prompt (pre-trained model) | 2 |" in text and "±" in text
    assert "mean ± sd" in text and "reaches the mean baseline final AP at" in text
    assert (folder / "ap_vs_iter.png").stat().st_size > 0
    assert "Saliency Prompt (pre-trained model) - baseline:" in out

    # Again: all four runs reused; another seed list reuses the shared seed's runs.
    code, _, err = _compare(toml, "--iters", "2", "--seeds", "0,1")
    assert code == 0 and err.count("reusing the finished run") == 4, err
    code, _, err = _compare(toml, "--iters", "2", "--seeds", "1")
    assert code == 0 and err.count("reusing the finished run") == 2, err
    # A folder is not a setting: the runs copied elsewhere, from a copied checkpoint (same
    # bytes, other path), are the same runs.
    shutil.copytree(folder, "moved")
    shutil.copy(ckpt, "moved/init.pt")
    code, _, err = _compare(
        toml, "--iters", "2", "--seeds", "0,1", "--out", "moved", "--pretrained", "moved/init.pt"
    )
    assert code == 0 and err.count("reusing the finished run") == 4, err
    # A pre-training or stage-one setting is not a fine-tuning setting (the init is pinned by its
    # bytes): the baseline runs are reused under a changed [pretrain] and [proposals].
    code, _, err = _compare(
        toml, "--iters", "2", "--seeds", "0,1", "--out", "moved", "--pretrained", "moved/init.pt",
        "--set", "pretrain.eval_size=teacher", "--set", "proposals.top_k=3",
    )  # fmt: skip
    assert code == 0 and err.count("reusing the finished run") == 4, err
    # Other settings in an existing run folder are refused, naming the key.
    code, _, err = _compare(toml, "--iters", "3", "--seeds", "0")
    assert code == 2 and "other settings" in err and "finetune.iters" in err
    # Re-running pre-training rewrites last.pt behind the same path: the finished "sp" runs
    # were made from the old bytes and are neither reused nor resumed.
    state = load_checkpoint(ckpt)
    state["iteration"] = 2  # any change to the file's bytes
    torch.save(state, ckpt)
    code, _, err = _compare(toml, "--iters", "2", "--seeds", "0")
    assert code == 2 and "initialised from a different checkpoint" in err


def test_statistics_by_hand():
    assert mean_sd([]) == {"mean": None, "sd": None, "n": 0}
    assert mean_sd([0.5]) == {"mean": 0.5, "sd": None, "n": 1}
    one = mean_sd([0.1, 0.3])
    assert one["mean"] == pytest.approx(0.2) and one["sd"] == pytest.approx(math.sqrt(0.02))
    curve = [{"iteration": 10, "AP": 0.1}, {"iteration": 20, "AP": 0.3}]
    assert first_reach(curve, 0.2) == 20 and first_reach(curve, 0.5) is None
    final = {m: 0.2 for m in METRIC_NAMES}
    runs = [{"seed": s, "final": {**final, "AP": 0.1 * (s + 2), "APs": -1.0}} for s in (0, 1)]
    base = [{"seed": 1, "final": {**final, "AP": 0.25}}, {"seed": 5, "final": final}]
    diff = paired_differences(runs, base)
    assert [p["seed"] for p in diff["pairs"]] == [1]  # only seeds present in both
    assert diff["pairs"][0]["AP"] == pytest.approx(0.05)
    assert diff["pairs"][0]["APs"] is None and diff["APs"]["n"] == 0  # -1: no difference
