"""``trainer pseudo-label``: a self-training round from a tiny pre-training checkpoint over real
stage-one proposals (random ResNet-50), read back by the shard reader, ``inspect`` and
``pretrain``; the seeds of predicted masks; empty rounds; resume and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from pipeline.backbones.build import build_backbone
from pipeline.backbones.weight_files import file_sha256
from pipeline.cli import UserError
from pipeline.shards.folder import folder_problems
from pipeline.shards.schema import STATUS_EMPTY, STATUS_OK, list_shards, read_meta
from pipeline.shards.shard_reader import ShardReader
from tests.trainer.helpers import run_cli, run_pipeline
from tests.trainer.tiny_project import pretrain, sets, write_project
from trainer.config import load_config
from trainer.stages.mask_seeds import mask_seeds
from trainer.stages.pretrain_shards import check_shards

STAGE_ONE = [
    "backbone.kind=resnet50",
    "backbone.weights=random",
    "proposals.short_side=128",
    "proposals.max_side=128",
    "proposals.shard_size=4",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(root, config, pre-training checkpoint, stage-one proposals of the 8 train images)."""
    root = tmp_path_factory.mktemp("pseudo")
    toml = write_project(root)
    ckpt = pretrain(toml, root / "pretrain", 1)
    proposals = stage_one_proposals(toml, root / "data" / "train", root / "proposals")
    return root, toml, ckpt, proposals


def stage_one_proposals(toml: Path, images: Path, out: Path) -> Path:
    """Stage one (random ResNet-50, STAGE_ONE sizes, local executor) over ``images``; returns
    ``out``."""
    stage_one = [a for s in STAGE_ONE for a in ("--set", s)]
    code, _, err = run_pipeline(
        "proposals", "--config", str(toml), *stage_one, "--executor", "local",
        "--images", str(images), "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    return out


def _label(ckpt: Path, shards: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        "pseudo-label", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out),
        *extra,
    )  # fmt: skip


def _cell_footprint(pos, rec, stride: int, resized: tuple[int, int]) -> tuple[slice, slice]:
    """Original-image pixels of a scale-0 cell (row, col)."""
    sy, sx = rec.height / resized[0], rec.width / resized[1]
    r, c = int(pos[1]), int(pos[2])
    rows = slice(math.floor(r * stride * sy), math.ceil((r + 1) * stride * sy))
    cols = slice(math.floor(c * stride * sx), math.ceil((c + 1) * stride * sx))
    return rows, cols


def test_a_round_is_a_finished_proposals_folder_that_inspect_and_pretrain_read(project, tmp_path):
    root, toml, ckpt, proposals = project
    out = tmp_path / "round2"
    code, stdout, err = _label(ckpt, proposals, out, "--score-threshold", "0", "--max-masks", "3")
    assert code == 0, err
    assert "8 ok" in stdout and folder_problems(out) == []
    assert {"plan.json", "summary.json"} <= {p.name for p in out.iterdir()}
    source = [r for p in list_shards(proposals) for r in ShardReader(p).records()]
    meta = read_meta(list_shards(out)[0])
    record = json.loads(meta["self_training"])
    assert record["round"] == 2 and record["checkpoint_sha256"] == file_sha256(ckpt)
    assert record["source_fingerprint"] == read_meta(list_shards(proposals)[0])["fingerprint"]
    assert meta["embed_dim"] == 2048 and meta["backbone"] == "resnet50"
    labelled = [r for p in list_shards(out) for r in ShardReader(p).records()]
    assert [(r.file_name, r.image_id) for r in labelled] == [
        (r.file_name, r.image_id) for r in source
    ]
    resized = (128, 128)  # the 64 x 64 images at stage one's short_side
    for rec in labelled:
        assert rec.status == STATUS_OK and 1 <= rec.num_masks <= 3
        assert np.all(np.diff(rec.scores) <= 0) and rec.seeds.shape == (rec.num_masks, 2048)
        norms = np.linalg.norm(rec.seeds.astype(np.float32), axis=1)
        assert np.allclose(norms, 1.0, atol=2e-3)
        for mask, pos in zip(rec.decode_masks(), rec.seed_pos):
            assert pos[0] == 0
            rows, cols = _cell_footprint(pos, rec, 32, resized)
            assert mask[rows, cols].any()  # the seed's cell lies inside its mask
    code, stdout, err = run_pipeline("inspect", str(out))
    assert code == 0, err
    assert "images: 8  ok 8" in stdout and '"round": 2' in stdout

    code, _, err = run_cli(
        "pretrain", "--config", str(toml), *sets(), "--shards", str(out),
        "--out", str(tmp_path / "pretrain2"), "--iters", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "self-training round 2" in err and "8 images from 2 shards" in err
    # A round-2 pre-training checkpoint fine-tunes as any other.
    code, _, err = run_cli(
        "finetune", "--config", str(toml), *sets(), "--frac", "0.5", "--iters", "1",
        "--init", str(tmp_path / "pretrain2" / "checkpoints" / "last.pt"),
        "--out", str(tmp_path / "finetune2"),
    )  # fmt: skip
    assert code == 0, err

    # A third round reads the second: round 3, the same stage-one origin.
    code, _, err = _label(ckpt, out, tmp_path / "round3", "--score-threshold", "0")
    assert code == 0, err
    third = json.loads(read_meta(list_shards(tmp_path / "round3")[0])["self_training"])
    assert third["round"] == 3 and third["source_fingerprint"] == meta["fingerprint"]
    assert third["stage_one_fingerprint"] == record["stage_one_fingerprint"]


def test_merged_rounds_keep_the_source_masks_the_model_did_not_replace(project, tmp_path):
    root, _, ckpt, proposals = project
    source = [r for p in list_shards(proposals) for r in ShardReader(p).records()]
    # No prediction passes a threshold of 1: model-first keeps exactly the source's masks.
    out = tmp_path / "all-source"
    code, stdout, err = _label(
        ckpt, proposals, out, "--score-threshold", "1", "--merge", "model-first"
    )
    assert code == 0, err
    merged = [r for p in list_shards(out) for r in ShardReader(p).records()]
    assert [r.rles for r in merged] == [r.rles for r in source]
    assert all(np.array_equal(a.seeds, b.seeds) for a, b in zip(merged, source))
    record = json.loads(read_meta(list_shards(out)[0])["self_training"])
    assert record["labelling"]["merge"] == {"mode": "model-first", "iou": 0.5}
    # source-first: every source mask, plus only predictions overlapping none of them.
    out = tmp_path / "source-first"
    code, _, err = _label(ckpt, proposals, out, "--score-threshold", "0", "--merge", "source-first")
    assert code == 0, err
    alone = tmp_path / "alone"
    assert _label(ckpt, proposals, alone, "--score-threshold", "0")[0] == 0
    predicted = [r for p in list_shards(alone) for r in ShardReader(p).records()]
    merged = [r for p in list_shards(out) for r in ShardReader(p).records()]
    for m, s, pr in zip(merged, source, predicted):
        assert set(s.rles) <= set(m.rles) and set(m.rles) <= set(s.rles) | set(pr.rles)
        assert np.all(np.diff(m.scores) <= 0)
    code, _, err = _label(ckpt, proposals, tmp_path / "o", "--merge-iou", "1.5")
    assert code == 2 and "--merge-iou" in err


def test_a_threshold_above_every_score_records_empty_images(project, tmp_path):
    root, toml, ckpt, proposals = project
    out = tmp_path / "empty"
    code, stdout, err = _label(ckpt, proposals, out, "--score-threshold", "1")
    assert code == 0, err
    assert "0 ok, 8 empty" in stdout and folder_problems(out) == []
    for path in list_shards(out):
        with ShardReader(path) as reader:
            table = reader.image_table()
        assert set(table["status"].tolist()) == {STATUS_EMPTY}
        assert set(table["mask_count"].tolist()) == {0}
        assert all(e.startswith("score: ") for e in table["error"])
    code, stdout, err = run_pipeline("inspect", str(out))
    assert code == 0, err
    assert "empty 8" in stdout and "empty x8: score" in stdout
    code, _, err = run_cli(
        "pretrain", "--config", str(toml), *sets(), "--shards", str(out), "--out",
        str(tmp_path / "pre"), "--iters", "1",
    )  # fmt: skip
    assert code == 2 and "no image has a proposal mask" in err


def test_a_killed_round_resumes_and_other_folders_are_refused(project, tmp_path):
    root, _, ckpt, proposals = project
    out = tmp_path / "round2"
    assert _label(ckpt, proposals, out)[0] == 0
    first = (out / "shard-00000.h5").read_bytes()
    # As a kill leaves it: one shard never renamed into place, its temporary file left behind.
    (out / "shard-00001.h5").unlink()
    (out / "shard-00001.h5.999.tmp").write_bytes(b"half")
    assert folder_problems(out)  # not finished: pretrain would refuse it
    code, _, err = _label(ckpt, proposals, out)
    assert code == 0, err
    assert "1 already done" in err and folder_problems(out) == []
    assert (out / "shard-00000.h5").read_bytes() == first
    assert not list(out.glob("*.tmp"))
    # Other settings into the same folder, or any other non-empty folder: one line.
    code, _, err = _label(ckpt, proposals, out, "--max-masks", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not empty" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = _label(ckpt, proposals, tmp_path / "other")
    assert code == 2 and "not empty" in err


def test_bad_input_is_one_line(project, tmp_path):
    root, toml, ckpt, proposals = project
    code, _, err = _label(ckpt, tmp_path / "nowhere", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nowhere" in err
    code, _, err = _label(tmp_path / "none.pt", proposals, tmp_path / "o")
    assert code == 2 and "checkpoint not found" in err
    code, _, err = _label(ckpt, proposals, tmp_path / "o", "--score-threshold", "2")
    assert code == 2 and "--score-threshold" in err
    # A fine-tuning checkpoint (two classes) is refused: rounds relabel class-agnostically.
    run = tmp_path / "finetune"
    code, _, err = run_cli(
        "finetune", "--config", str(toml), *sets(), "--frac", "0.5", "--iters", "1",
        "--init", str(ckpt), "--out", str(run),
    )  # fmt: skip
    assert code == 0, err
    code, _, err = _label(run / "checkpoints" / "last.pt", proposals, tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fine-tuning checkpoint" in err
    assert not (tmp_path / "o").exists() or not list_shards(tmp_path / "o")


def test_pretrain_checks_a_round_by_its_chain(project, tmp_path):
    root, toml, ckpt, proposals = project
    out = tmp_path / "round2"
    assert _label(ckpt, proposals, out)[0] == 0
    cfg = load_config(toml, ["backbone.kind=resnet50", "backbone.weights=random"])
    backbone = build_backbone(cfg.backbone)
    meta = read_meta(list_shards(out)[0])
    shards = SimpleNamespace(folder=out, metas=[meta], meta=meta)
    assert any("self-training round 2" in n for n in check_shards(shards, backbone, cfg))
    edited = dict(meta, self_training=meta["self_training"].replace('"round": 2', '"round": 5'))
    with pytest.raises(UserError, match="does not match the shards' fingerprint"):
        check_shards(SimpleNamespace(folder=out, metas=[edited], meta=edited), backbone, cfg)
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)  # other weights: the chain's stage one differs
    with pytest.raises(UserError, match="other resnet50 weights"):
        check_shards(shards, backbone, cfg)
    with h5py.File(list_shards(out)[0], "r") as f:
        assert "self_training" in f.attrs


def test_mask_seeds_average_the_cells_under_the_mask():
    torch.manual_seed(0)
    stride, c = 4, 8
    features = torch.randn(c, 5, 6)  # a padded batch's map: the image covers 4 x 5 cells
    direction = torch.zeros(c)
    direction[2] = 1.0
    features[:, 1:3, 1:3] = direction[:, None, None] * torch.tensor([1.0, 3.0])[None, None, :]
    features[0, 1, 2] = 0.1  # the most typical cell is (1, 1), exactly on the direction
    masks = torch.zeros(2, 16, 20, dtype=torch.bool)  # the original image is the resized one
    masks[0, 4:12, 4:12] = True  # exactly cells (1..2, 1..2)
    masks[1, 13, 17] = True  # one pixel: the cell it covers most, (3, 4)
    seeds, pos = mask_seeds(features, (4, 5), (16, 20), stride, masks)
    assert seeds.shape == (2, c) and torch.allclose(seeds.norm(dim=1), torch.ones(2))
    assert torch.nn.functional.cosine_similarity(seeds[0], direction, dim=0) > 0.99
    assert pos[0].tolist() == [0, 1, 1] and pos[1].tolist() == [0, 3, 4]
    expected = torch.nn.functional.normalize(features[:, 3, 4], dim=0)
    assert torch.allclose(seeds[1], expected, atol=1e-6)
    empty_seeds, empty_pos = mask_seeds(features, (4, 5), (16, 20), stride, masks[:0])
    assert empty_seeds.shape == (0, c) and empty_pos.shape == (0, 3)
