"""A self-training round (as in CutLER): a pre-trained model's confident masks become pseudo masks.

    python -m trainer pseudo-label --checkpoint CKPT --shards SRC --out DIR
                                   [--score-threshold 0.5] [--max-masks 20] [--nms 0.5]
                                   [--merge off|model-first|source-first] [--merge-iou 0.5]
                                   [--image-root DIR] [--set SECTION.KEY=VALUE ...]

Runs a class-agnostic pre-training checkpoint (``Predictor.from_checkpoint``, the one inference
path) over exactly the images of the finished proposals folder SRC (stage one's, or an earlier
round's), shard by shard in the same order, and keeps each image's masks scoring at least
``--score-threshold``: mask NMS at ``--nms`` IoU (0: off), then at most ``--max-masks``. Each kept
mask gets the model's detection score, its box, and a seed embedding S_l with its position from
the frozen backbone's stage-one feature map (trainer/stages/mask_seeds.py: the L2-normalised mean
of the cell seeds under the mask, and the cell most similar to it). Images where nothing passes are
recorded empty with the reason ``score: ...``; unreadable images as unreadable. ``--merge``
keeps SRC's masks beside the predictions, CutLER's merge (trainer/stages/pseudo_merge.py).

DIR becomes a finished proposals folder of schema-v1 shards that ``pipeline inspect`` reads and
``trainer pretrain --shards DIR`` trains on: ``plan.json`` first, each shard written atomically,
``summary.json`` last (pipeline/shards/folder.py), the run holding DIR's lock throughout. The
shards record the round (trainer/stages/self_training.py). DIR must be empty, or hold this same job
(same source, checkpoint and settings), which a re-run then resumes, skipping finished shards.

A fine-tuning checkpoint (several classes, or class names) is refused: a round's pseudo masks
come from the class-agnostic pre-trained model. The model settings come from the checkpoint's own
config; ``--set`` overrides them; ``--config`` is not read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic_files import write_json
from pipeline.backbones.build import build_backbone
from pipeline.backbones.weight_files import file_sha256
from pipeline.cli import UserError, record_run
from pipeline.config import ConfigError, ProposalConfig, from_dict
from pipeline.executors.proposals import prepare_out
from pipeline.executors.worker import ProposalWorker, count_existing, count_records
from pipeline.inputs.image_files import ImageLimits, UnreadableImage
from pipeline.inputs.images import decode_image
from pipeline.inputs.listing import ImageItem
from pipeline.run_folder import claim_run_folder
from pipeline.shards.folder import SUMMARY_FILE, folder_problems
from pipeline.shards.plan import check_image_file, plan_inputs, recorded_inputs
from pipeline.shards.schema import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageRecord,
    read_meta,
    shard_name,
    write_shard,
)
from pipeline.shards.shard_reader import ShardReader
from trainer.data.datasets import Collate
from trainer.data.shard_dataset import proposals_image_root
from trainer.inference.predictor import Predictor
from trainer.stages.mask_seeds import mask_seeds
from trainer.stages.pseudo_merge import MERGE_MODES, merge_records
from trainer.stages.self_training import ATTR, check_out, next_round, round_fingerprint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="pre-training checkpoint (.pt)")
    parser.add_argument("--shards", required=True, help="finished proposals folder to relabel")
    parser.add_argument("--out", required=True, help="new proposals folder (empty, or resumed)")
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="keep masks scoring at least this"
    )
    parser.add_argument("--max-masks", type=int, default=20, help="at most this many per image")
    parser.add_argument("--nms", type=float, default=0.5, metavar="IOU", help="mask NMS (0: off)")
    parser.add_argument(
        "--merge", choices=MERGE_MODES, default="off",
        help="keep SRC's masks too: model-first adds those overlapping no prediction (CutLER), "
        "source-first adds the predictions overlapping no SRC mask",
    )  # fmt: skip
    parser.add_argument("--merge-iou", type=float, default=0.5, help="overlap for --merge")
    parser.add_argument(
        "--image-root", default=None, help="image folder (default: the one SRC records)"
    )


def _check_arguments(args: argparse.Namespace) -> None:
    if not all(0.0 <= v <= 1.0 for v in (args.score_threshold, args.nms, args.merge_iou)):
        raise UserError("pseudo-label: --score-threshold, --nms and --merge-iou must lie in [0, 1]")
    if args.max_masks < 1:
        raise UserError(f"pseudo-label: --max-masks must be >= 1, got {args.max_masks}")


@dataclasses.dataclass
class Source:
    """A finished proposals folder: what ``check_shards`` reads (folder, metas, meta), each
    shard's path and images, and the image root and file sizes its plan recorded."""

    folder: Path
    paths: list[Path]
    metas: list[dict[str, Any]]
    shards: list[list[ImageItem]]
    sizes: list[list[tuple[int, int, int]]]  # per shard and image: (status, height, width)
    image_root: Path
    file_bytes: dict[str, int]

    @property
    def meta(self) -> dict[str, Any]:
        return self.metas[0]


def read_source(folder: Path, image_root: str | None) -> Source:
    """The images of ``folder``'s shards; UserError for a missing or unfinished folder."""
    from pipeline.shards.folder_reader import shard_paths

    paths = shard_paths(folder)  # one line for a missing folder or one without shards
    problems = folder_problems(folder)
    if problems:
        raise UserError(f"{folder} is not a finished proposals result: {'; '.join(problems)}")
    root = Path(image_root).expanduser() if image_root else proposals_image_root(folder)
    if root is None:
        raise UserError(f"{folder} records no image root: pass --image-root")
    shards, sizes = [], []
    for path in paths:
        with ShardReader(path) as reader:
            t = reader.image_table()
        names, ids = t["file_name"].tolist(), t["image_id"].tolist()
        shards.append([ImageItem(n, int(i), root / n) for n, i in zip(names, ids)])
        sizes.append(list(zip(t["status"].tolist(), t["height"].tolist(), t["width"].tolist())))
    recorded = recorded_inputs(folder).get("file_bytes", {})
    metas = [read_meta(p) for p in paths]
    return Source(folder, list(paths), metas, shards, sizes, root, recorded)


def _decode(item: ImageItem, source: Source, known: tuple[int, int, int], worker) -> Any:
    """The image as stage one decoded it, or the reason (str) it cannot be read. UserError when
    it is another picture than the one the source describes (other bytes or size)."""
    check_image_file(item.path, item.file_name, source.file_bytes, source.image_root)
    try:
        rgb = decode_image(item.path, worker.min_side, worker.limits)
    except (UnreadableImage, OSError) as e:
        return (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or "unreadable"
    status, height, width = known
    if status != STATUS_UNREADABLE and rgb.shape[:2] != (height, width):
        raise UserError(
            f"{item.path} is {rgb.shape[1]}x{rgb.shape[0]} but {source.folder} describes it as "
            f"{width}x{height}: the image changed after the proposals were made"
        )
    return rgb


def label_batch(
    items: list[ImageItem], decoded: list[Any], predictor: Predictor, worker, max_masks: int
) -> list[ImageRecord]:
    """Records of one batch: the model's kept masks with their seeds, in the batch's order."""
    good = [j for j, d in enumerate(decoded) if not isinstance(d, str)]
    found, feats, valid, loaded = {}, None, [], []
    if good:
        loaded = [worker.prepare(items[j], decoded[j]) for j in good]
        feats, valid = worker.features(loaded)  # stage one's feature map of these images
        batch = Collate(predictor.model.size_divisor)([predictor.prepare(decoded[j]) for j in good])
        found = dict(zip(good, predictor.predict_batch(batch)))
    records = []
    threshold = predictor.settings.score_threshold
    for j, item in enumerate(items):
        if j not in found:
            records.append(
                ImageRecord(item.file_name, item.image_id, 0, 0, STATUS_UNREADABLE, decoded[j])
            )
            continue
        h, w = decoded[j].shape[:2]
        inst, b = found[j], good.index(j)
        k = min(len(inst), max_masks)
        if k == 0:
            reason = f"score: no non-empty mask scores at least score_threshold {threshold:g}"
            records.append(ImageRecord(item.file_name, item.image_id, h, w, STATUS_EMPTY, reason))
            continue
        masks = torch.from_numpy(inst.masks[:k])
        seeds, pos = mask_seeds(
            feats[b], valid[b], loaded[b].resized, int(worker.backbone.saliency_stride), masks
        )
        records.append(
            ImageRecord(
                item.file_name,
                item.image_id,
                h,
                w,
                STATUS_OK,
                rles=[r["counts"] for r in inst.rles[:k]],
                boxes=inst.boxes[:k],
                scores=inst.scores[:k],
                seeds=seeds.cpu().numpy().astype(np.float16),
                seed_pos=pos.numpy().astype(np.int16),
            )
        )
    return records


def label_shard(index: int, source: Source, predictor, worker, args, bar) -> dict:
    """Relabel source shard ``index`` into ``worker.out_dir``, written atomically (merged with
    the source's masks by ``args.merge``); its counts."""
    items, known = source.shards[index], source.sizes[index]
    bs = max(1, int(worker.cfg.batch_size))  # stage one's batches: the same padded feature maps
    records: list[ImageRecord] = []
    for start in range(0, len(items), bs):
        batch = items[start : start + bs]
        decoded = [_decode(it, source, k, worker) for it, k in zip(batch, known[start:])]
        records += label_batch(batch, decoded, predictor, worker, args.max_masks)
        bar.update(len(batch))
    if args.merge != "off":
        with ShardReader(source.paths[index]) as reader:
            records = [
                merge_records(r, reader.record(i), args.merge, args.merge_iou)
                for i, r in enumerate(records)
            ]
    write_shard(worker.out_dir / shard_name(index), records, worker.meta)
    return {**count_records(records), "index": index}


def load_model(args: argparse.Namespace, device: torch.device) -> Predictor:
    """The checkpoint as a class-agnostic predictor with the round's decoding settings."""
    predictor = Predictor.from_checkpoint(
        Path(args.checkpoint),
        device=device,
        overrides=args.overrides,
        score_threshold=args.score_threshold,
        nms_iou=args.nms,
    )
    if not predictor.class_agnostic:
        raise UserError(
            f"pseudo-label: {args.checkpoint} is a fine-tuning checkpoint "
            f"({len(predictor.categories)} classes); a self-training round relabels with a "
            "class-agnostic pre-training checkpoint"
        )
    s = predictor.settings  # NMS runs before the --max-masks cut: decode enough candidates
    s.max_detections = max(s.max_detections, args.max_masks)
    return predictor


def build_worker(source: Source, predictor: Predictor, out: Path, device) -> ProposalWorker:
    """Stage one's frozen backbone and input settings (from SRC's shards), verified as
    ``trainer pretrain`` verifies shards: kind, width and weights (through a round's chain).
    Pre-training keeps its backbone frozen, so the model's own serves (the check proves it)."""
    from trainer.stages.pretrain_shards import check_shards

    cfg = predictor.config
    backbone = getattr(predictor.model, "backbone", None)
    if backbone is None:
        backbone = build_backbone(cfg.backbone)
    for note in check_shards(source, backbone, cfg):
        print(f"pseudo-label: note: {note}", file=sys.stderr)
    try:
        made_with = from_dict(ProposalConfig, json.loads(source.meta["settings"]))
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise UserError(f"{source.folder}: unreadable proposal settings ({e})") from None
    made_with = dataclasses.replace(made_with, compile=False)  # same features, no warm-up
    limits = ImageLimits.from_data(cfg.data)
    _, stage_one = next_round(source.meta, source.folder)
    return ProposalWorker(
        cfg.backbone, made_with, out, str(device), backbone=backbone, fingerprint=stage_one,
        limits=limits,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pipeline.precision import default_device

    _check_arguments(args)
    source = read_source(Path(args.shards), args.image_root)
    if not Path(args.checkpoint).is_file():
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    device = default_device()
    predictor = load_model(args, device)
    out = Path(args.out)
    round_, stage_one = next_round(source.meta, source.folder)
    s = predictor.settings
    record = {
        "round": round_,
        "source_fingerprint": str(source.meta.get("fingerprint")),
        "stage_one_fingerprint": stage_one,
        "checkpoint_sha256": file_sha256(args.checkpoint),
        "labelling": {
            "score_threshold": args.score_threshold,
            "max_masks": args.max_masks,
            "nms": args.nms,
            "mask_threshold": s.mask_threshold,
            "short_side": s.short_side,
            "max_side": s.max_side,
        },
    }
    if args.merge != "off":  # absent when off: earlier rounds keep their fingerprints
        record["labelling"]["merge"] = {"mode": args.merge, "iou": args.merge_iou}
    fingerprint = round_fingerprint(record)
    with claim_run_folder(out, "pseudo-label"):
        check_out(out, fingerprint)
        worker = build_worker(source, predictor, out, device)
        worker.meta.update(fingerprint=fingerprint, settings=source.meta["settings"])
        worker.meta[ATTR] = json.dumps(record, sort_keys=True)
        return _label(args, source, predictor, worker, record)


def _label(args, source: Source, predictor, worker, record: dict[str, Any]) -> int:
    out = worker.out_dir
    items = [it for shard in source.shards for it in shard]
    inputs = {**plan_inputs(source.folder, items), ATTR: record}
    size = max(len(s) for s in source.shards)
    done = prepare_out(out, source.shards, size, worker.meta["fingerprint"], False, inputs)
    resolved = dataclasses.asdict(predictor.config)
    record_run(out, resolved)
    todo = [i for i in range(len(source.shards)) if i not in done]
    print(
        f"pseudo-label: round {record['round']} from {source.folder} ({len(items)} images, "
        f"{len(source.shards)} shards, {len(done)} already done) with {args.checkpoint} on "
        f"{predictor.device} -> {out}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    total = sum(len(source.shards[i]) for i in todo)
    with tqdm(total=total, desc="pseudo-label", unit="img", disable=total == 0) as bar:
        counts = [label_shard(i, source, predictor, worker, args, bar) for i in todo]
    counts += [count_existing(out / shard_name(i)) for i in sorted(done)]
    seconds = time.perf_counter() - t0
    totals = {k: sum(c[k] for c in counts) for k in ("images", "ok", "empty", "unreadable")}
    totals["masks"] = sum(c["masks"] for c in counts)
    write_json(
        out / SUMMARY_FILE,
        {
            **totals,
            "shards": len(source.shards),
            "computed_shards": todo,
            "skipped_shards": sorted(done),
            "failed_shards": {},
            "seconds": round(seconds, 3),
            "masks_per_image": round(totals["masks"] / max(1, totals["ok"] + totals["empty"]), 3),
            "unreadable_files": [e for c in counts for e in c["errors"]],
            ATTR: record,
        },
    )
    print(
        f"pseudo-label: {totals['ok']} ok, {totals['empty']} empty, {totals['unreadable']} "
        f"unreadable images; {totals['masks']} masks; {seconds:.1f} s -> {out}"
    )
    return 0
