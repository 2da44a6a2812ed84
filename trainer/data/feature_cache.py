"""The frozen-feature cache: a fully frozen backbone's levels, computed once per image view.

Pre-training always keeps the backbone frozen (paper and code), and the demo's fine-tuning does
too (``frozen_stages = -1``), yet the frozen ViT's forward pass was 57% of every training step,
recomputing the same features for the same image every epoch. The cache keeps them on disk:

- **Key**: the backbone weights' fingerprint (a folder per fingerprint) and, per entry, the
  image file's bytes (blake2b), the resized input size and the flip, plus :data:`CACHE_FORMAT`.
  Any change of weights, pixels, size or flip is a miss, never a stale hit.
- **Exact**: entries hold the per-image levels of ``trainer.data.frozen_features`` in float32, the same
  tensors the trainer computes without the cache (a test trains both ways and compares losses).
  Settings where a cached entry could not be exact are refused with one line: a trainable
  backbone stage, a pixel-changing augmentation (rotation), a backbone that is not batch invariant.
- **Atomic and resumable**: an entry is written under a temporary name and renamed, so a killed
  run leaves no half entry and a rerun computes only what is missing; stale temporaries of dead
  processes are removed on start. DataLoader workers read entries; the training process writes
  them (each DDP rank its own batch; identical bytes, so a race is harmless).

Not for COCO-scale ResNet pyramids (about 60 MB of C2-C5 per image at 1333x800, and ResNet's
border cells depend on the batch padding): the right tool for ViT features and small sets.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.cli import UserError
from trainer.data.frozen_features import FrozenFeatures, is_fully_frozen

# Bump when decoding, resizing or normalisation change the pixels, or the levels' computation
# changes. 2: each image's levels computed alone (trainer/data/frozen_features.py), bitwise a function
# of the image; format 1 entries came from padded batches and differ from these in the last bits.
CACHE_FORMAT = 2
ENTRY_SUFFIX = ".npz"


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes: the image identity in the cache key."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FeatureStore:
    """Entries ``<root>/<fingerprint[:16]>[-<precision>]/<key>.npz`` for one backbone run in one
    precision (fp32 folders carry no suffix, as before precisions existed).

    ``get``/``put`` take a sample's info dict ("content", "image_size", "flipped").
    """

    def __init__(self, root: str | Path, fingerprint: str, precision: str = "fp32") -> None:
        suffix = "" if precision == "fp32" else f"-{precision}"
        self.folder = Path(root).expanduser() / (fingerprint[:16] + suffix)
        self.fingerprint = fingerprint
        self.precision = precision
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / "backbone.json"
        if not marker.exists():
            tmp = marker.with_name(f".backbone.json.{os.getpid()}.tmp")
            info = {"fingerprint": fingerprint, "format": CACHE_FORMAT, "precision": precision}
            tmp.write_text(json.dumps(info))
            os.replace(tmp, marker)
        self._check_marker(marker)
        self.clean_temps()

    def _check_marker(self, marker: Path) -> None:
        """Levels of one precision never serve another: a folder recorded for another precision
        (or backbone) is refused instead of mixed."""
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            return  # an unreadable marker: entries are still keyed by content and size
        made = info.get("precision", "fp32")  # folders from before precisions hold fp32 levels
        if made != self.precision or info.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise UserError(
                f"feature cache {self.folder} holds {made} levels of backbone "
                f"{str(info.get('fingerprint'))[:16]}, not {self.precision} levels of "
                f"{self.fingerprint[:16]}; delete the folder or set another feature_cache_dir"
            )

    def key(self, info: dict[str, Any]) -> str:
        h, w = (int(v) for v in info["image_size"])
        text = f"{CACHE_FORMAT}|{info['content']}|{h}x{w}|{int(bool(info.get('flipped')))}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def path(self, info: dict[str, Any]) -> Path:
        return self.folder / (self.key(info) + ENTRY_SUFFIX)

    def get(self, info: dict[str, Any]) -> list[torch.Tensor] | None:
        """The entry's levels, or None when it is not there (or unreadable: then recomputed)."""
        path = self.path(info)
        try:
            with np.load(path) as data:
                return [torch.from_numpy(data[f"level{k}"]) for k in range(len(data.files))]
        except (OSError, ValueError, KeyError, EOFError):
            return None

    def put(self, info: dict[str, Any], levels: list[torch.Tensor]) -> None:
        path = self.path(info)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        arrays = {f"level{k}": t.detach().float().cpu().numpy() for k, t in enumerate(levels)}
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    def clean_temps(self) -> int:
        """Remove temporaries left by processes that died while writing; returns how many."""
        removed = 0
        for tmp in self.folder.glob(".*.tmp"):
            try:
                pid = int(tmp.name.rsplit(".", 2)[-2])
            except ValueError:
                continue
            if not _pid_alive(pid):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def stats(self) -> dict[str, Any]:
        entries = list(self.folder.glob("*" + ENTRY_SUFFIX))
        size = sum(p.stat().st_size for p in entries)
        return {"folder": str(self.folder), "entries": len(entries), "bytes": size}


class CachedDataset(Dataset):
    """Wraps a training or evaluation dataset: each sample's info gets its image's digest and, when
    the store holds the entry, its levels ("cached_levels"). Other attributes pass through."""

    def __init__(self, base: Dataset, store: FeatureStore) -> None:
        self.base = base
        self.store = store

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "store"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        sample = self.base[key]
        info = sample["info"]
        info["content"] = file_digest(Path(self.base.image_root) / info["file_name"])
        cached = self.store.get(info)
        if cached is not None:
            info["cached_levels"] = cached
        return sample


def check_exact(backbone: Any, stage: str, *, rotate_prob: float = 0.0, rotate_deg: float = 0.0):
    """UserError (one line) for any setting where cached features could not be exact."""
    off = f"set {stage}.feature_cache = false"
    if not getattr(backbone, "batch_invariant", False):
        raise UserError(
            f"{stage}.feature_cache: {backbone.name} features depend on the batch padding, so a "
            f"cached entry would not be exact; {off}"
        )
    if not is_fully_frozen(backbone):
        raise UserError(
            f"{stage}.feature_cache needs a fully frozen backbone (frozen_stages = -1): a "
            f"trainable stage changes its features every step; {off}"
        )
    if rotate_prob > 0 and rotate_deg > 0:
        raise UserError(
            f"{stage}.feature_cache: rotation changes the pixels beyond resize and flip, so "
            f"cached features would be stale; set {stage}.rotate_prob = 0 or {off}"
        )


def frozen_inputs(
    backbone: Any,
    *,
    enabled: bool,
    cache_dir: str | Path,
    stage: str,
    datasets: list[Dataset],
    rotate_prob: float = 0.0,
    rotate_deg: float = 0.0,
    precision: str = "fp32",
) -> tuple[list[Dataset], FrozenFeatures | None, FeatureStore | None]:
    """The feature source a stage trains with, and its datasets (wrapped when caching).

    Returns (datasets, frozen, store): ``frozen`` is None when the backbone is not fully frozen or
    not batch invariant (the model then runs its backbone itself); ``store`` is None when the cache
    is off. ``enabled`` with a setting that cannot be exact is a UserError. ``precision``: the
    autocast the frozen backbone runs in (its levels are kept in fp32; the cache keys them by it).
    """
    if enabled:
        check_exact(backbone, stage, rotate_prob=rotate_prob, rotate_deg=rotate_deg)
    if not (is_fully_frozen(backbone) and getattr(backbone, "batch_invariant", False)):
        return datasets, None, None
    if not enabled:
        return datasets, FrozenFeatures(backbone, precision=precision), None
    from pipeline.backbones.backbone import weights_fingerprint

    store = FeatureStore(cache_dir, weights_fingerprint(backbone), precision)
    wrapped = [CachedDataset(d, store) for d in datasets]
    return wrapped, FrozenFeatures(backbone, store, precision), store


def cache_dir(cfg: Any, section: Any) -> Path:
    """A stage's cache folder: its ``feature_cache_dir`` when set; else runs/<name>/feature-cache
    for a run folder inside runs/<name>/ (the default layout, compare and study: pre-training,
    fine-tuning and evaluation share it, same backbone, same images, same entries); else
    ``feature-cache`` beside the run folder, so a run sent elsewhere with ``--out`` writes
    nothing into runs/ of the current directory."""
    if section.feature_cache_dir:
        return Path(section.feature_cache_dir)
    shared = Path(f"runs/{cfg.name}")
    out = Path(section.out or shared / "run")
    if out.resolve().is_relative_to(shared.resolve()):
        return shared / "feature-cache"
    return out.parent / "feature-cache"


def describe(store: FeatureStore | None) -> str:
    """One line for the run's log: where the cache is and how big it has grown."""
    if store is None:
        return "feature cache off"
    s = store.stats()
    return f"feature cache {s['folder']}: {s['entries']} entries, {s['bytes'] / 2**20:.1f} MiB"
