"""Where fine-tuning starts: the init checkpoint (a pre-training's, another path, or none for the
baseline), loading every tensor whose name and shape match while naming the skipped class layers,
and the init's record (path and sha256) that a resume and compare's reuse check."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.cli import UserError
from trainer.config import Config

NO_INIT = "none"


def default_init(cfg: Config) -> Path:
    """The pre-training run's last checkpoint (pretrain.out, else runs/<name>/pretrain)."""
    return Path(cfg.pretrain.out or f"runs/{cfg.name}/pretrain") / "checkpoints" / "last.pt"


def load_init(knet: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a pre-trained K-Net into ``knet``: every tensor whose name and shape match.

    Only the model's class layers (its CLASS_LAYER_PREFIXES) may be skipped; anything else missing,
    unexpected or of another shape is a UserError. Returns the sorted skipped names.
    """
    from trainer.engine.checkpoint import load_checkpoint, load_matching, model_state

    state = load_checkpoint(path)
    try:
        return load_matching(
            knet, model_state(state, knet, path), allowed_skips=knet.CLASS_LAYER_PREFIXES
        )
    except UserError as e:
        raise UserError(f"--init {path}: {e}") from None


def init_record(init: str) -> dict[str, str | None]:
    """What a run was initialised from: {"init": path or "none", "sha256": file digest or None}."""
    from pipeline.backbones.weight_files import file_sha256

    if init == NO_INIT:
        return {"init": NO_INIT, "sha256": None}
    if not Path(init).is_file():
        raise UserError(
            f"pre-training checkpoint not found: {init} (run `make pretrain` first, pass "
            "--init CKPT, or --init none for the baseline)"
        )
    return {"init": init, "sha256": file_sha256(init)}


def check_init(out: Path, record: dict[str, str | None]) -> None:
    """Refuse to continue or reuse a run folder initialised from another checkpoint.

    The init checkpoint is a path, and re-running pre-training rewrites the file behind the same
    path; without this check a resumed (or reused, see trainer/experiments/compare.py) fine-tuning
    would mix
    or report weights that came from the old pre-training. The same bytes under another path
    (a copied run folder and its checkpoint) are the same init.
    """
    path = out / "init.json"
    if not path.is_file():
        return
    then = json.loads(path.read_text())
    # The bytes decide, not the path: a checkpoint copied or moved elsewhere is the same init.
    same_bytes = then.get("sha256") is not None and then.get("sha256") == record["sha256"]
    if not same_bytes and then != record:
        what = "a different" if then.get("init") == record["init"] else "another"
        raise UserError(
            f"{out} was initialised from {what} checkpoint ({then.get('init')}, sha256 "
            f"{str(then.get('sha256'))[:12]}; now {record['init']}, "
            f"{str(record['sha256'])[:12]}): delete that folder or choose another --out"
        )


def initialise(cfg: Config, knet: torch.nn.Module) -> tuple[list[str], str]:
    """Load the init checkpoint into ``knet`` (nothing for the baseline): (skipped tensors, a
    line saying what the run starts from)."""
    if cfg.finetune.init == NO_INIT:
        return [], (
            f"baseline: backbone weights only ({cfg.backbone.kind} "
            f"'{cfg.backbone.weights or 'default'}'), fresh heads"
        )
    from pipeline.backbones.backbone import weights_fingerprint

    configured = weights_fingerprint(knet.backbone)
    skipped = load_init(knet, cfg.finetune.init)
    same = weights_fingerprint(knet.backbone) == configured
    return skipped, (
        f"initialised from {cfg.finetune.init}; skipped {len(skipped)} tensors (class layers): "
        f"{', '.join(skipped) or 'none'}; backbone "
        f"{'identical to' if same else 'differs from'} backbone.weights"
    )
