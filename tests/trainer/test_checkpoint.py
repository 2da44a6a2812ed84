"""Checkpoint files: one-line errors for what is not a checkpoint, the newest intact one when
last.pt is damaged, pruning, and frozen backbones stored as a fingerprint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.backbones.backbone import weights_fingerprint
from pipeline.cli import UserError
from trainer.engine.checkpoint import (
    load_checkpoint,
    load_latest,
    model_state,
    numbered_checkpoints,
    prune_checkpoints,
    save_checkpoint,
    strip_frozen,
)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.zeros(3), "holds a Tensor, not a checkpoint dict"),
        ([1, 2, 3], "holds a list, not a checkpoint dict"),
    ],
)
def test_a_checkpoint_that_is_not_a_dict_is_one_line(tmp_path, content, message):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(UserError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_a_text_file_is_not_a_pytorch_checkpoint(tmp_path):
    path = tmp_path / "text.pt"
    path.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(UserError, match="text.pt: not a PyTorch checkpoint file"):
        load_checkpoint(path)


def _run_with_checkpoints(tmp_path, iterations):
    ckpts = tmp_path / "run" / "checkpoints"
    for it in iterations:
        save_checkpoint(ckpts / f"iter_{it:07d}.pt", {"iteration": it})
    return ckpts


def test_corrupt_last_falls_back_to_the_newest_intact_iter(tmp_path, capsys):
    ckpts = _run_with_checkpoints(tmp_path, [2, 4])
    (ckpts / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    path, state = load_latest(tmp_path / "run")
    assert path.name == "iter_0000004.pt" and state["iteration"] == 4
    err = capsys.readouterr().err
    assert "last.pt" in err and "newest intact checkpoint" in err and "iter_0000004.pt" in err
    # A damaged newest iter_ too: the one before it.
    (ckpts / "iter_0000004.pt").write_bytes(b"garbage")
    assert load_latest(tmp_path / "run")[1]["iteration"] == 2


def test_no_loadable_checkpoint_is_an_error_and_none_is_a_fresh_start(tmp_path):
    assert load_latest(tmp_path / "empty") == (None, None)
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.pt").write_text("x")
    with pytest.raises(UserError, match="no loadable checkpoint"):
        load_latest(tmp_path / "run")


def test_prune_keeps_the_newest_n(tmp_path):
    ckpts = _run_with_checkpoints(tmp_path, [1, 2, 10, 11])
    removed = prune_checkpoints(ckpts, 2)
    assert [p.name for p in removed] == ["iter_0000001.pt", "iter_0000002.pt"]
    assert [p.name for p in numbered_checkpoints(ckpts)] == ["iter_0000010.pt", "iter_0000011.pt"]
    assert prune_checkpoints(ckpts, 0) == []  # 0 keeps all


class _Net(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)


def test_frozen_backbone_is_a_fingerprint_checked_on_load(tmp_path):
    net = _Net(0)
    kept, record = strip_frozen(net, net.state_dict())
    assert record is None and set(kept) == set(net.state_dict())  # trainable: stored
    net.backbone.requires_grad_(False)
    kept, record = strip_frozen(net, net.state_dict())
    assert set(kept) == {"head.weight", "head.bias"}
    assert record["fingerprint"] == weights_fingerprint(net.backbone)
    state = {"model": kept, "frozen_backbone": record}
    full = model_state(state, _Net(0), "ck.pt")
    assert torch.equal(full["backbone.weight"], net.backbone.weight)
    with pytest.raises(UserError, match="ck.pt was trained on other backbone weights"):
        model_state(state, _Net(1), "ck.pt")
