"""Checkpoints: atomic save, safe load, partial loading by name and shape, RNG state capture.

A training checkpoint (written by trainer/engine.py) is a dict::

    {"model": objective.knet.state_dict(), "extras": pre-training-only modules (kernel
     supervision Linear), "optimizer", "scheduler", "scaler" (None without fp16 scaling),
     "rng": capture_rng_state(), "loader": sampler (epoch, position), "iteration",
     "config": resolved config dict, "num_classes", "log_window": partial logging window}

Everything in it is a tensor or a plain Python value, so it loads with ``weights_only=True``
(no arbitrary unpickling of a file someone handed you).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``; UserError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load checkpoint {path}: {first}") from None


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
