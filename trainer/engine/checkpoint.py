"""Checkpoints: atomic save, safe load, partial loading by name and shape, RNG state capture.

A training checkpoint (written by trainer/engine/run_state.py) is a dict::

    {"model": objective.knet.state_dict(), "extras": pre-training-only modules (kernel
     supervision Linear), "optimizer", "scheduler", "scaler" (None without fp16 scaling),
     "rng": capture_rng_state(), "loader": sampler (epoch, position), "iteration",
     "config": resolved config dict, "num_classes", "log_window": partial logging window,
     "frozen_backbone": {"prefix", "fingerprint"} or absent, "ema": the weight average's
     {"decay", "updates", "state"} or None (trainer/engine/weight_average.py)}

Everything in it is a tensor or a plain Python value, so it loads with ``weights_only=True``
(no arbitrary unpickling of a file someone handed you).

A backbone that is frozen whole is rebuilt from the config's weights on every load, so its
tensors are not stored (88 MB of ViT-S per checkpoint): "model" lacks them and "frozen_backbone"
records their fingerprint, which :func:`model_state` checks before filling them back in.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.atomic_files import with_path
from pipeline.cli import UserError


def _temp_path(path: Path) -> Path:
    # Same folder, so os.replace is an atomic rename; pid keeps concurrent writers apart.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except RuntimeError:
        # torch's zip writer reports a failed write as RuntimeError ("unexpected pos N", "file
        # write failed"); checked before the temporary file is removed and frees the space.
        full = _disk_nearly_full(path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise with_path(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _disk_nearly_full(folder: Path, margin: int = 16 * 2**20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def link_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` (e.g. last.pt) the same file as ``src`` atomically: a hard link when the file
    system allows it (no second copy on disk), else a copy; either way renamed into place."""
    src, dst = Path(src), Path(dst)
    tmp = _temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``; UserError (one line) when it is
    missing, unreadable, not a PyTorch file, or holds something other than a dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror}") from None
    # torch.save writes a zip archive (or, in old versions, a pickle starting with 0x80); the
    # unpickler's own message for anything else is a bare byte value ("101").
    if magic[:2] != b"PK" and magic[:1] != b"\x80":
        raise UserError(f"cannot load checkpoint {path}: not a PyTorch checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"cannot load checkpoint {path}: {_first_line(e)}") from None
    if not isinstance(state, dict):
        raise UserError(
            f"{path} holds a {type(state).__name__}, not a checkpoint dict "
            "(expected the dict written by the trainer, with 'model', 'config', ...)"
        )
    return state


# More classes than any instance-segmentation label set has (LVIS: 1,203): a checkpoint claiming
# more is crafted or damaged, and building its classifier would allocate without bound.
MAX_CLASSES = 100_000


def training_config(state: dict[str, Any], path: str | Path) -> tuple[dict[str, Any], int]:
    """The resolved config and class count a training checkpoint records; UserError (one line
    naming the field) when either is missing or not sensible (num_classes negative, a string,
    10^9)."""
    raw, num_classes = state.get("config"), state.get("num_classes")
    if not isinstance(raw, dict) or num_classes is None:
        raise UserError(f"{path} is not a training checkpoint (no config / num_classes)")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise UserError(f"{path}: num_classes must be a whole number, got {num_classes!r}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UserError(f"{path}: num_classes {num_classes} is not in [1, {MAX_CLASSES}]")
    return raw, num_classes


# --------------------------------------------------------------------------------------------
# A run's checkpoints: the newest intact one, pruning


_ITER_RE = re.compile(r"^iter_(\d+)\.pt$")


def numbered_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """``iter_*.pt`` files of a checkpoints folder, oldest first."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _ITER_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_ITER_RE.match(p.name).group(1)))


def load_latest(out_dir: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state) of the newest loadable checkpoint of a run: ``last.pt``, else the newest
    intact ``iter_*.pt`` (saying so on stderr); (None, None) when the run has none.

    A corrupt last.pt (a disk fault, a bad copy) must not strand the intact numbered checkpoints
    next to it. UserError when checkpoints exist but none loads.
    """
    folder = Path(out_dir) / "checkpoints"
    candidates = [folder / "last.pt"] if (folder / "last.pt").is_file() else []
    candidates += numbered_checkpoints(folder)[::-1]
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except UserError as e:
            problems.append(str(e))
            continue
        if problems:
            print(
                f"warning: {problems[0]}; resuming from the newest intact checkpoint {path}",
                file=sys.stderr,
            )
        return path, state
    if problems:
        raise UserError(f"no loadable checkpoint in {folder} ({problems[0]})")
    return None, None


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``iter_*.pt`` (``keep`` <= 0 keeps all); last.pt is a
    link to the newest, so it stays valid. Returns the deleted paths."""
    if keep <= 0:
        return []
    old = numbered_checkpoints(ckpt_dir)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old


# --------------------------------------------------------------------------------------------
# Frozen backbones: stored as a fingerprint, rebuilt from the config


def frozen_backbone(knet: nn.Module) -> nn.Module | None:
    """``knet.backbone`` when it has parameters and none of them trains, else None."""
    backbone = getattr(knet, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return None
    params = list(backbone.parameters())
    return backbone if params and not any(p.requires_grad for p in params) else None


def strip_frozen(knet: nn.Module, model_state: dict[str, Any], fingerprint: str | None = None):
    """(model_state without a wholly frozen backbone's tensors, the "frozen_backbone" record or
    None). ``fingerprint``: the backbone's, if already computed (it never changes)."""
    from pipeline.backbones.backbone import weights_fingerprint

    backbone = frozen_backbone(knet)
    if backbone is None:
        return model_state, None
    kept = {k: v for k, v in model_state.items() if not k.startswith("backbone.")}
    record = {"prefix": "backbone.", "fingerprint": fingerprint or weights_fingerprint(backbone)}
    return kept, record


def model_state(
    state: dict[str, Any], knet: nn.Module, path: str | Path, *, averaged: bool = True
) -> dict[str, Any]:
    """``state["model"]`` completed with ``knet``'s own backbone tensors when the checkpoint
    recorded a frozen backbone instead of storing it; UserError when ``knet``'s backbone is not
    the one the checkpoint was trained with (other weights).

    ``averaged``: where the run kept a weight average (``"ema"``, trainer/engine/weight_average.py)
    its tensors replace the trained ones: the weights a finished run offers. A resume passes
    False, since the optimiser continues from the trained weights."""
    from pipeline.backbones.backbone import weights_fingerprint

    model = state.get("model")
    if not isinstance(model, dict):
        raise UserError(f"{path} holds no 'model' state (not a trainer checkpoint)")
    average = state.get("ema")
    if averaged and average:
        model = {**model, **average["state"]}
    frozen = state.get("frozen_backbone")
    if not frozen:
        return model
    backbone = getattr(knet, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise UserError(f"{path} expects a model with a backbone")
    if weights_fingerprint(backbone) != frozen.get("fingerprint"):
        raise UserError(
            f"{path} was trained on other backbone weights than backbone.weights gives "
            f"(fingerprint {str(frozen.get('fingerprint'))[:12]}); set backbone.weights to "
            "the ones it was trained with"
        )
    prefix = str(frozen.get("prefix", "backbone."))
    return {**{prefix + k: v for k, v in backbone.state_dict().items()}, **model}


def load_matching(
    model: nn.Module, state_dict: dict[str, Any], allowed_skips: tuple[str, ...] = ()
) -> list[str]:
    """Load every tensor of ``state_dict`` whose name and shape match ``model``'s.

    Returns the sorted names that were not loaded (missing in the checkpoint, unexpected in it,
    or of another shape). Raises UserError if any of them does not start with one of
    ``allowed_skips`` (e.g. the class layers when the class count changes).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        k
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(torch.as_tensor(state_dict[k]).shape)
    ]
    skipped = sorted(set(missing) | set(unexpected) | set(mismatched))
    bad = [k for k in skipped if not k.startswith(tuple(allowed_skips))]
    if bad:
        kinds = []
        for name, group in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape-mismatched", mismatched),
        ):
            names = [k for k in group if k in bad]
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                kinds.append(f"{name}: {', '.join(names[:3])}{more}")
        raise UserError("checkpoint does not fit the model; " + "; ".join(kinds))
    matching = {k: v for k, v in state_dict.items() if k in own and k not in mismatched}
    model.load_state_dict(matching, strict=False)
    return skipped


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global) and torch CPU/CUDA generator states as loadable plain values."""
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002 (the global one is what we save)
    np_state["state"] = {
        "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
        "pos": int(np_state["state"]["pos"]),
    }
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        "key": np_state["state"]["key"].numpy().astype(np.uint32),
        "pos": np_state["state"]["pos"],
    }
    np.random.set_state(np_state)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
