"""A pre-training checkpoint's pretext fit at each evaluation size, beside its teacher.

    python bench/pretext_fit.py --checkpoint RUN/checkpoints/last.pt [--sizes train,teacher]
        [--set section.key=value ...] [--out FILE]

Rebuilds the run's pre-training from its config.toml (same shards, held-out share and pseudo-mask
selection), loads the checkpoint, and scores it class-agnostically at every ``pretrain.eval_size``
in ``--sizes``: against the held-out images' pseudo masks and against the val ground truth, with
the teacher's detection budget. The teacher (``teacher.json`` of the run) is printed beside it.
Writes a JSON (default bench/results/pretext_fit.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.precision import stage_precision  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine.checkpoint import load_checkpoint, model_state  # noqa: E402
from trainer.stages.pretext import make_pretext_eval  # noqa: E402
from trainer.stages.pretrain import build_pretraining  # noqa: E402
from trainer.stages.pretrain_shards import shards_folder  # noqa: E402


def fit_at(cfg, state, checkpoint: Path, size: str) -> dict[str, float]:
    """The pretext eval_fn's scores of the checkpoint with ``pretrain.eval_size = size``."""
    cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, eval_size=size))
    device = torch.device("cpu")
    built = build_pretraining(cfg, shards_folder(cfg), None, device)
    knet = built.objective.knet
    knet.load_state_dict(model_state(state, knet, checkpoint))
    precision = stage_precision(cfg.pretrain, device, "pretrain")
    eval_fn = make_pretext_eval(
        cfg, knet, built.heldout, device, frozen=built.frozen, store=built.store,
        precision=precision,
    )  # fmt: skip
    knet.eval()
    with torch.no_grad():
        return eval_fn(int(state["iteration"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sizes", default="train,teacher")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="bench/results/pretext_fit.json")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    run = checkpoint.parent.parent
    cfg = load_config(run / "config.toml", args.overrides)
    state = load_checkpoint(checkpoint)
    teacher_file = run / "teacher.json"
    teacher = json.loads(teacher_file.read_text()) if teacher_file.is_file() else None
    result = {"checkpoint": str(checkpoint), "iteration": int(state["iteration"]), "sizes": {}}
    for size in args.sizes.split(","):
        t0 = time.perf_counter()
        scores = fit_at(cfg, state, checkpoint, size)
        scores["wall_seconds"] = time.perf_counter() - t0
        result["sizes"][size] = scores
        print(
            f"{size}: held-out AP {scores.get('heldout_AP', float('nan')):.4f}, "
            f"val AP {scores.get('val_AP', float('nan')):.4f} "
            f"(AP50 {scores.get('val_AP50', float('nan')):.4f})"
        )
    if teacher:
        result["teacher_val"] = {k: teacher[k] for k in ("AP", "AP50", "AP75") if k in teacher}
        print(f"teacher: val AP {teacher['AP']:.4f} (AP50 {teacher['AP50']:.4f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
