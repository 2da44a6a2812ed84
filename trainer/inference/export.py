"""Export a trained model with its backbone to ONNX and check it against PyTorch.

    python -m trainer export --checkpoint CKPT [--out model.onnx] [--images IMG ...]

The graph takes ``images``: (1, 3, H, W) float32, an ImageNet-normalised image resized as the
checkpoint resizes it (``Predictor.prepare``) and zero-padded bottom/right to a multiple of the
model's size divisor (H and W are dynamic). It returns ``scores`` (1, N, C), the detection score of
every (kernel, class) pair, and ``masks`` (1, N, H / mask_stride, W / mask_stride), the last
stage's mask logits; ``trainer/inference/instances.py`` turns them into instances (top-k, resize,
threshold).

The export runs the backbone inside the graph on the padded image. The Predictor runs a frozen
ViT on each image's own pixels instead (padding outside the tokens), so for a ViT an image whose
resized size is not a multiple of the divisor gives slightly different numbers from ``predict``;
the check below compares the graph with the same PyTorch module on the same padded input, which
is what the export must preserve.

After writing the file, onnxruntime runs it on the given images (default: two synthetic images of
different shapes) and the maximum absolute differences against PyTorch are reported; above
``--tolerance`` the command fails. TorchScript-based export (``dynamo=False``, opset 17).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.cli import UserError
from trainer.data.datasets import Collate
from trainer.data.transforms import pad_to
from trainer.inference.predictor import Predictor
from trainer.model.scoring import detection_scores

OPSET = 17
TOLERANCE = 1e-3
DYNAMIC_AXES = {"images": {2: "height", 3: "width"}, "masks": {2: "h", 3: "w"}}


class ExportedModel(nn.Module):
    """images -> (scores, mask logits) of the last stage: the part of a model ONNX holds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        last = self.model(images)["stages"][-1]
        return detection_scores(self.model, last), last["masks"]


def export_onnx(predictor: Predictor, path: Path, example: Tensor, dynamic: bool = True) -> Path:
    """Write the model as ONNX to ``path`` (height and width dynamic, or fixed to the example's);
    UserError naming the op when an operator has no ONNX form."""
    wrapped = ExportedModel(predictor.model).eval().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Not under no_grad: there nn.MultiheadAttention takes its fused fast path
        # (aten::_native_multi_head_attention), which has no ONNX form.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on Python-side shape arithmetic
            torch.onnx.export(
                wrapped,
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=["scores", "masks"],
                dynamic_axes=DYNAMIC_AXES if dynamic else None,
            )
    except Exception as e:  # the exporter raises several types; the first line names the op
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot export {type(predictor.model).__name__} to ONNX: {first}"
        ) from None
    return path


def padded_input(predictor: Predictor, image: Any) -> Tensor:
    """(1, 3, Hp, Wp): one image prepared as the Predictor prepares it."""
    return Collate(predictor.model.size_divisor)([predictor.prepare(image)]).images


def compare(predictor: Predictor, path: Path, inputs: list[Tensor]) -> list[dict[str, Any]]:
    """Per input: its shape and the max absolute difference of scores and mask logits between
    onnxruntime and PyTorch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapped = ExportedModel(predictor.model).eval().cpu()
    rows = []
    for x in inputs:
        with torch.no_grad():
            ref = [t.float().numpy() for t in wrapped(x)]
        got = session.run(None, {"images": x.numpy()})
        diffs = [float(np.abs(a - b).max()) for a, b in zip(ref, got)]
        rows.append({"shape": list(x.shape), "scores": diffs[0], "masks": diffs[1]})
    return rows


def synthetic_images(seed: int = 0) -> list[np.ndarray]:
    """Two smooth RGB images of different aspect ratios (so both dynamic axes are exercised)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((240, 320), (300, 200)):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], axis=2)
        noisy = 127 + 100 * base + rng.normal(0, 10, (h, w, 3))
        out.append(noisy.clip(0, 255).astype(np.uint8))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fine-tuning or pre-training .pt")
    parser.add_argument("--out", default="", help="ONNX file (default: <checkpoint>.onnx)")
    parser.add_argument(
        "--images", nargs="*", default=[], help="images to check on (default: two synthetic)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help="largest allowed difference"
    )
    parser.epilog = "The model settings come from the checkpoint's own config (--set applies)."


def _worst(rows: list[dict[str, Any]]) -> float:
    return max(max(r["scores"], r["masks"]) for r in rows)


def export_checked(
    predictor: Predictor, out: Path, images: list[Any], tolerance: float
) -> tuple[list[dict[str, Any]], str]:
    """Export with dynamic height and width and check on every image; when another input size
    than the traced one is off (the tracer froze a shape-dependent value into the graph:
    Mask2Former's deformable-attention level shapes), export again for one fixed square input
    that every image is padded to. Returns (the check's rows, a note on the input size)."""
    inputs = [padded_input(predictor, image) for image in images]
    export_onnx(predictor, out, inputs[0])
    rows = compare(predictor, out, inputs)
    if _worst(rows) <= tolerance or len({tuple(x.shape) for x in inputs}) == 1:
        return rows, "input height and width dynamic (multiples of the size divisor)"
    dynamic_worst = _worst(rows)
    d = predictor.model.size_divisor
    side = -(-max(predictor.settings.max_side, *(max(x.shape[-2:]) for x in inputs)) // d) * d
    inputs = [pad_to(x, side, side) for x in inputs]
    export_onnx(predictor, out, inputs[0], dynamic=False)
    rows = compare(predictor, out, inputs)
    note = (
        f"input fixed at {side}x{side}: with dynamic sizes another size than the traced one "
        f"differed by {dynamic_worst:.2e} (shape-dependent values frozen by the tracer); pad "
        "every image to it"
    )
    return rows, note


def run(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    predictor = Predictor.from_checkpoint(path, overrides=args.overrides)
    out = Path(args.out) if args.out else path.with_suffix(".onnx")
    rows, note = export_checked(predictor, out, args.images or synthetic_images(), args.tolerance)
    for row in rows:
        print(
            f"export: input {row['shape']}: max |onnxruntime - PyTorch| scores "
            f"{row['scores']:.2e}, mask logits {row['masks']:.2e}"
        )
    if _worst(rows) > args.tolerance:
        raise UserError(f"{out}: onnxruntime differs from PyTorch by {_worst(rows):.2e}")
    print(f"export: {out} ({out.stat().st_size / 2**20:.1f} MiB), {note}")
    return 0
