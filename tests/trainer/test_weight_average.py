"""The weight average (pretrain.ema_decay): the EMA formula with its warm-up, a frozen backbone
left out, weights swapped only inside ``applied``, and in the engine: scored beside the trained
weights, stored in checkpoints, restored exactly on resume, offered to readers of the
checkpoint while a resume continues from the trained weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.trainer.test_engine import TinyObjective, _setup
from trainer.engine.checkpoint import load_checkpoint, model_state
from trainer.engine.loop import train
from trainer.engine.metrics_log import read_metrics
from trainer.engine.schedule import Schedule
from trainer.engine.weight_average import WeightAverage


def test_average_follows_the_ema_formula_with_warm_up():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    average = WeightAverage(net, decay=0.9)
    expected = net.weight.detach().clone()
    for n in range(100):  # (1 + n) / (10 + n) passes 0.9 at n = 81
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * net.weight.detach()
        average.update()
    assert torch.allclose(average.shadow["weight"], expected, atol=1e-6)
    assert average.current_decay() == 0.9  # the warm-up is over


def test_applied_swaps_the_weights_and_restores_them():
    net = nn.Linear(2, 2)
    average = WeightAverage(net, decay=0.5)
    trained = net.weight.detach().clone()
    average.shadow["weight"].fill_(7.0)
    with average.applied():
        assert torch.all(net.weight == 7.0)
    assert torch.equal(net.weight.detach(), trained)
    with pytest.raises(RuntimeError), average.applied():  # restored after an error too
        raise RuntimeError("evaluation failed")
    assert torch.equal(net.weight.detach(), trained)


def test_frozen_backbone_is_not_averaged_and_decay_is_checked():
    knet = TinyObjective().knet
    assert sorted(WeightAverage(knet, 0.99).names) == ["head.bias", "head.weight"]
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(knet, 1.0)


def _train(out, iters, *, resume=False, eval_fn=None):
    objective, loader, optimizer, scheduler = _setup()
    schedule = Schedule(
        iters=iters, clip_grad=1.0, amp=False, log_every=1, ckpt_every=2,
        eval_every=2 if eval_fn else 0, ema_decay=0.8,
    )  # fmt: skip
    train(objective, loader, optimizer, scheduler, schedule, out_dir=out, device="cpu",
          resume=resume, config={"name": "tiny"}, eval_fn=eval_fn)  # fmt: skip
    return objective


def test_engine_keeps_the_average_through_a_resume(tmp_path):
    straight = _train(tmp_path / "a", 6)
    _train(tmp_path / "b", 4)
    resumed = _train(tmp_path / "b", 6, resume=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6
    for name, tensor in a["ema"]["state"].items():
        assert torch.equal(tensor, b["ema"]["state"][name]), name
    assert torch.equal(straight.knet.head.weight, resumed.knet.head.weight)
    # Readers of the checkpoint get the average; a resume asks for the trained weights.
    knet = resumed.knet
    offered = model_state(a, knet, "a")
    assert torch.equal(offered["head.weight"], a["ema"]["state"]["head.weight"])
    assert not torch.equal(offered["head.weight"], a["model"]["head.weight"])
    trained = model_state(a, knet, "a", averaged=False)
    assert torch.equal(trained["head.weight"], a["model"]["head.weight"])


def test_each_evaluation_scores_both_weights(tmp_path):
    def eval_fn(iteration):
        return {"w": float(objective_ref[0].knet.head.weight.sum())}

    objective_ref: list = []
    objective, loader, optimizer, scheduler = _setup()
    objective_ref.append(objective)
    schedule = Schedule(
        iters=4, clip_grad=1.0, amp=False, log_every=1, ckpt_every=2, eval_every=2,
        ema_decay=0.8,
    )  # fmt: skip
    train(objective, loader, optimizer, scheduler, schedule, out_dir=tmp_path, device="cpu",
          resume=False, config={"name": "tiny"}, eval_fn=eval_fn)  # fmt: skip
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [2, 4]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    last = evals[-1]
    assert last["w"] == pytest.approx(float(state["model"]["head.weight"].sum()), abs=1e-5)
    assert last["ema_w"] == pytest.approx(
        float(state["ema"]["state"]["head.weight"].sum()), abs=1e-5
    )
    assert last["w"] != last["ema_w"]


def test_pretext_summary_reports_the_average_beside_the_trained_weights():
    from trainer.stages.pretext import learner_and_teacher

    row = {"heldout_AP": 0.1, "val_AP": 0.2, "ema_heldout_AP": 0.15, "ema_val_AP": 0.3}
    curve = [{"iteration": 5, **{k.replace("AP", m): v for k, v in row.items()
                                  for m in ("AP", "AP50", "AP75")}}]  # fmt: skip
    summary = learner_and_teacher(curve, {"AP": 0.25})
    assert summary["ema_val"]["final"]["AP"] == 0.3
    assert summary["learner_minus_teacher_val_AP"] == pytest.approx(-0.05)
    assert summary["ema_learner_minus_teacher_val_AP"] == pytest.approx(0.05)


def test_pretrain_scores_and_stores_the_average_and_refuses_to_drop_it_on_resume(tmp_path):
    import json

    from tests.trainer.helpers import run_cli
    from tests.trainer.test_pretrain import _args, make_shards

    shards, out = make_shards(tmp_path), tmp_path / "pretrain"
    extra = ["--set", "pretrain.holdout=0.5", "--set", "pretrain.holdout_seed=3",
             "--set", "pretrain.eval_every=2",
             "--set", "data.val_json=", "--set", "pretrain.ema_decay=0.9"]  # fmt: skip
    code, _, stderr = run_cli(*_args(shards, out, 2, *extra))
    assert code == 0, stderr
    (row,) = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "eval"]
    assert 0 <= row["ema_heldout_AP"] <= 1 and 0 <= row["heldout_AP"] <= 1
    assert "ema_heldout" in json.loads((out / "pretext.json").read_text())
    assert load_checkpoint(out / "checkpoints" / "last.pt")["ema"]["updates"] == 2
    code, _, stderr = run_cli(*_args(shards, out, 4, "--resume", *extra[:-2]))  # average off
    assert code != 0 and "pretrain.ema_decay" in stderr and "Traceback" not in stderr
