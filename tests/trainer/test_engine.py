"""The training engine with a tiny objective: schedule, exact resume, non-finite stop, atomic
checkpoints, partial loading, logging outputs, and a two-process DDP run on gloo."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pipeline.cli import UserError
from tests.trainer.helpers import train_records
from trainer.config import FinetuneConfig, PretrainConfig
from trainer.data.datasets import make_sample
from trainer.data.loader import build_loader
from trainer.data.transforms import Augment
from trainer.engine.checkpoint import load_checkpoint, load_matching, save_checkpoint
from trainer.engine.distributed import shutdown_distributed
from trainer.engine.loop import train
from trainer.engine.metrics_log import LogWindow, loss_groups, read_metrics
from trainer.engine.optim import build_optimizer, build_scheduler, optimizer_from_section
from trainer.engine.schedule import Schedule


class TinyDataset(torch.utils.data.Dataset):
    """Random-looking images with one or two box masks, augmented from the sampler's seed."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        base = np.random.default_rng(100 + index)
        image = base.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        masks = np.zeros((1 + index % 2, 20, 24), np.uint8)
        masks[0, 2:12, 3 + index : 15 + index] = 1
        if masks.shape[0] > 1:
            masks[1, 10:18, 1:9] = 1
        labels = np.zeros(masks.shape[0], np.int64)
        seeds = base.standard_normal((masks.shape[0], 4)).astype(np.float16)
        augment = Augment(20, 40, flip=0.5)
        return make_sample(
            image, masks, labels, seeds, augment, np.random.default_rng(seed), {"image_id": index}
        )


class TinyObjective(nn.Module):
    """Shaped like the real Objective: ``knet`` (with a frozen ``backbone``) plus an extra,
    pre-training-only module; uses torch, NumPy and Python randomness in forward."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.knet = nn.Module()
        self.knet.backbone = nn.Conv2d(3, 6, 3, padding=1)
        self.knet.backbone.requires_grad_(False)
        self.knet.head = nn.Conv2d(6, 1, 1)
        self.knet.num_classes = 1
        self.extra = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.3)
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, images, targets):
        self.calls += 1
        logits = self.knet.head(self.drop(torch.relu(self.knet.backbone(images))))[:, 0]
        union = torch.stack([t["masks"].amax(0) for t in targets])
        loss_mask = nn.functional.binary_cross_entropy_with_logits(logits, union)
        seeds = torch.cat([t["seeds"] for t in targets])
        loss_extra = (self.extra(seeds).pow(2).mean() - 1.0).abs()
        if self.nan_at is not None and self.calls == self.nan_at:
            loss_mask = loss_mask * float("nan")
        noise = float(np.random.random() + random.random())  # noqa: NPY002 (tests RNG restore)
        return {
            "loss_mask": loss_mask,
            "loss_extra": 0.5 * loss_extra,
            "stat_noise": torch.tensor(noise),
            "stat_seeds": seeds.mean().detach(),
        }


def _setup(seed: int = 0, nan_at: int | None = None, workers: int = 0):
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the entry points seed the global generators too)
    random.seed(seed)
    objective = TinyObjective(nan_at)
    loader = build_loader(
        TinyDataset(), 2, size_divisor=8, device="cpu", num_workers=workers, seed=seed
    )
    optimizer = build_optimizer(objective, 1e-2, 0.05)
    scheduler = build_scheduler(optimizer, 2, 0.1, [4], 0.5)
    return objective, loader, optimizer, scheduler


def _train(
    out, iters, *, resume=False, ckpt_every=3, nan_at=None, workers=0, log_every=1, config=None
):
    objective, loader, optimizer, scheduler = _setup(nan_at=nan_at, workers=workers)
    # Draws between setup and training must not matter on resume (the RNG state is restored).
    torch.rand(3)
    result = train(
        objective,
        loader,
        optimizer,
        scheduler,
        Schedule(iters=iters, clip_grad=1.0, amp=False, log_every=log_every, ckpt_every=ckpt_every),
        out_dir=out,
        device="cpu",
        resume=resume,
        config=config or {"name": "tiny"},
    )
    return objective, result


def test_warmup_then_step_schedule():
    objective = TinyObjective()
    objective.knet.backbone.requires_grad_(True)
    optimizer = build_optimizer(objective, 1.0, 0.05, backbone_lr_mult=0.25)
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["heads", "backbone"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 6
    scheduler = build_scheduler(optimizer, 10, 0.001, [20, 30], 0.1)
    lrs = []
    for _ in range(32):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = {
        0: 0.001,
        5: 0.001 + 0.999 * 0.5,
        9: 0.001 + 0.999 * 0.9,
        10: 1.0,
        19: 1.0,
        20: 0.1,
        29: 0.1,
        30: 0.01,
        31: 0.01,
    }
    for it, factor in expected.items():
        assert lrs[it] == pytest.approx([factor, 0.25 * factor], rel=1e-9), it
    frozen = TinyObjective()
    assert len(build_optimizer(frozen, 1.0, 0.0).param_groups) == 1  # frozen backbone left out


def test_schedule_and_optimizer_from_config_sections():
    pre = PretrainConfig(iters=7, clip_grad=0.5, amp=True, log_every=3, ckpt_every=4, eval_every=5)
    assert Schedule.from_section(pre) == Schedule(
        iters=7,
        clip_grad=0.5,
        amp=True,
        log_every=3,
        ckpt_every=4,
        eval_every=5,  # the pretext fit's interval (trainer/stages/pretext.py)
        keep_checkpoints=2,
    )
    assert Schedule.from_section(FinetuneConfig(eval_every=9)).eval_every == 9
    ft = FinetuneConfig(eval_every=0)
    assert Schedule.from_section(ft, eval_every=ft.iters).eval_every == ft.iters
    with pytest.raises(TypeError, match="has no 'clip_grad'"):
        Schedule.from_section(SimpleNamespace(iters=1, amp=False, log_every=1, ckpt_every=1))

    objective = TinyObjective()
    objective.knet.backbone.requires_grad_(True)
    section = FinetuneConfig(
        lr=2.0,
        weight_decay=0.1,
        backbone_lr_mult=0.5,
        warmup_iters=2,
        warmup_ratio=0.5,
        lr_steps=[3],
        lr_gamma=0.1,
    )
    optimizer, scheduler = optimizer_from_section(objective, section)
    assert optimizer.defaults["weight_decay"] == 0.1
    lrs = []
    for _ in range(4):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    # Warm-up 0.5 -> 0.75 -> 1, then x 0.1 from iteration 3; the backbone at half the rate.
    expected = [[2.0 * f, 1.0 * f] for f in (0.5, 0.75, 1.0, 0.1)]
    assert lrs == [pytest.approx(e, rel=1e-9) for e in expected]
    # PretrainConfig has no backbone_lr_mult: a trainable backbone gets the heads' rate.
    optimizer, _ = optimizer_from_section(objective, PretrainConfig(lr=2.0, warmup_iters=0))
    assert [g["lr"] for g in optimizer.param_groups] == [2.0, 2.0]


def test_log_window_averages_and_state():
    window = LogWindow()
    window.add({"loss": 1.0, "stat_x": 4.0}, data_time=0.1, step_time=0.5, images=2)
    window.add({"loss": 3.0, "stat_x": 0.0}, data_time=0.3, step_time=1.5, images=2)
    averages = window.averages()
    assert list(averages) == ["loss", "stat_x", "data_wait", "images_per_s", "seconds_per_iter"]
    assert averages == pytest.approx(
        {"loss": 2.0, "stat_x": 2.0, "data_wait": 0.2, "images_per_s": 2.0, "seconds_per_iter": 1.0}
    )
    restored = LogWindow()
    restored.load_state_dict(window.state_dict())
    assert restored.averages() == averages
    assert loss_groups(["loss_s1_dice", "loss_init_dice", "loss_s1_mask"]) == {
        "dice": ["loss_init_dice", "loss_s1_dice"],
        "mask": ["loss_s1_mask"],
    }


def test_resume_equals_uninterrupted(tmp_path):
    straight, _ = _train(tmp_path / "a", 6)
    _train(tmp_path / "b", 3)
    resumed, result = _train(tmp_path / "b", 6, resume=True)
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_mask", "loss_extra", "stat_noise", "stat_seeds", "lr"):
            assert ra[key] == rb[key], (ra["iter"], key)
    assert len({r["loss"] for r in a}) == 6
    for pa, pb in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(pa, pb)
    assert result["iteration"] == 6
    # Already complete: a further resume trains nothing.
    _, again = _train(tmp_path / "b", 6, resume=True)
    assert again["iteration"] == 6 and again["last_record"] == {}


def test_resume_with_worker_and_log_window(tmp_path):
    """A DataLoader worker and a logging window that straddles the checkpoint."""
    _train(tmp_path / "a", 6, workers=1, log_every=4, ckpt_every=2)
    _train(tmp_path / "b", 2, workers=1, log_every=4, ckpt_every=2)
    _train(tmp_path / "b", 6, workers=1, log_every=4, ckpt_every=2, resume=True)
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r["iter"] for r in b] == [2, 4, 6]  # iters 2 (end of first run), 4, 6
    assert [r["iter"] for r in a] == [4, 6]
    for ra, rb in zip(a, b[1:]):
        assert ra["loss"] == rb["loss"] and ra["loss_mask"] == rb["loss_mask"]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="non-finite loss at iteration 5 .*loss_mask"):
        _train(out, 8, ckpt_every=2, nan_at=5)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["iter_0000002.pt", "iter_0000004.pt", "last.pt"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 4
    assert [r["iter"] for r in train_records(out)] == [1, 2, 3, 4]
    # A killed run (metrics written past the checkpoint) resumes to the uninterrupted result.
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"kind": "train", "iter": 5, "loss": 0.0}) + "\n")
    _train(out, 8, ckpt_every=2, resume=True)
    _train(tmp_path / "straight", 8, ckpt_every=2)
    assert [r["loss"] for r in train_records(out)] == [
        r["loss"] for r in train_records(tmp_path / "straight")
    ]


def test_outputs_and_checkpoint_contents(tmp_path):
    out = tmp_path / "run"
    _, result = _train(out, 4, ckpt_every=2, log_every=2)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert set(state) >= {
        "model",
        "extras",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "iteration",
        "config",
        "num_classes",
        "loader",
    }
    # The frozen backbone is rebuilt from the config: only its fingerprint is stored.
    assert set(state["model"]) == {"head.weight", "head.bias"}
    assert state["frozen_backbone"]["prefix"] == "backbone."
    assert len(state["frozen_backbone"]["fingerprint"]) == 64
    assert set(state["extras"]) == {"extra.weight", "extra.bias"}
    assert state["num_classes"] == 1 and state["config"] == {"name": "tiny"}
    assert state["loader"]["epoch"] == 1 and state["loader"]["position"] == 1  # 8 of 7 samples
    record = train_records(out)[-1]
    for key in (
        "lr",
        "loss",
        "loss_mask",
        "loss_extra",
        "stat_noise",
        "data_wait",
        "images_per_s",
        "grad_norm",
    ):
        assert key in record and np.isfinite(record[key])
    assert 0.0 <= record["data_wait"] <= 1.0 and 0.0 <= result["data_wait_share"] <= 1.0
    assert (out / "loss_curves.png").stat().st_size > 0
    assert any((out / "tensorboard").iterdir())
    leftovers = [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers
    with pytest.raises(UserError, match="--resume"):
        _train(out, 4)  # a fresh start must not overwrite an earlier run silently
    (out / "checkpoints" / "last.pt").unlink()  # resume falls back to the newest iter_*.pt
    changed = {"name": "tiny", "pretrain": {"lr": 1.0, "iters": 6}}
    with pytest.warns(UserWarning, match=r"changed settings \(pretrain.lr\)"):
        _, more = _train(out, 6, ckpt_every=2, log_every=2, resume=True, config=changed)
    assert more["trained"] == 2 and [r["iter"] for r in train_records(out)] == [2, 4, 6]


def test_eval_fn_records(tmp_path):
    objective, loader, optimizer, scheduler = _setup()
    seen = []

    def eval_fn(iteration):
        seen.append((iteration, objective.training, torch.is_grad_enabled()))
        return {"AP": 0.1 * iteration}

    with pytest.warns(UserWarning, match="CUDA only"):
        _eval_run(objective, loader, optimizer, scheduler, tmp_path, eval_fn)
    assert seen == [(2, False, False), (4, False, False), (5, False, False)]
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [(r["iter"], r["AP"]) for r in evals] == [(2, 0.2), (4, 0.4), (5, 0.5)]


def _eval_run(objective, loader, optimizer, scheduler, tmp_path, eval_fn):
    train(
        objective,
        loader,
        optimizer,
        scheduler,
        Schedule(iters=5, clip_grad=0.0, amp=True, log_every=5, ckpt_every=5, eval_every=2),
        out_dir=tmp_path,
        device="cpu",
        resume=False,
        config={},
        eval_fn=eval_fn,
    )


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"iteration": 1, "w": torch.ones(2)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"iteration": 2, "w": torch.zeros(2), "bad": Unpicklable()})
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(path)


def test_load_matching_skips_only_allowed():
    source = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    state = source.state_dict()
    skipped = load_matching(target, state, allowed_skips=("1.",))
    assert skipped == ["1.bias", "1.weight"]
    assert torch.equal(target[0].weight, source[0].weight)
    with pytest.raises(UserError, match="shape-mismatched: 1.weight"):
        load_matching(target, state, allowed_skips=())
    with pytest.raises(UserError, match="unexpected: extra"):
        load_matching(target, {**state, "extra": torch.ones(1)}, allowed_skips=("1.",))


# --------------------------------------------------------------------------------------------
# DDP on gloo


def _ddp_worker(rank: int, world: int, out: str) -> None:
    # A file rendezvous: no fixed port that another process on the machine could hold.
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world
    )
    try:
        objective, loader, optimizer, scheduler = _setup()
        train(
            objective,
            loader,
            optimizer,
            scheduler,
            Schedule(iters=3, clip_grad=1.0, amp=False, log_every=1, ckpt_every=3),
            out_dir=out,
            device="cpu",
            resume=False,
            config={},
        )
        weights = objective.knet.head.weight.detach().clone()
        gathered = [torch.zeros_like(weights) for _ in range(world)]
        torch.distributed.all_gather(gathered, weights)
        assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
    except BaseException:
        shutdown_distributed(barrier=False)
        raise
    shutdown_distributed()


def test_ddp_two_processes_on_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    records = train_records(tmp_path)
    assert [r["iter"] for r in records] == [1, 2, 3]
    assert records[0]["images_per_s"] > 0
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert len(state["rng_ranks"]) == 2 and state["loader"]["world_size"] == 2
    assert state["loader"]["position"] == 2  # 3 batches of 2 of rank 0's 4 per epoch
