"""Training sections of an experiment file: model, pretrain (stage two), finetune (stage three).

Schedules are counted in iterations, not epochs, so a run's length does not silently change with
the dataset size; ``configs/coco_r50.toml`` shows the paper's epochs converted to iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pipeline.config import (
    BackboneConfig,
    DataConfig,
    ProposalConfig,
    from_dict,
    read_toml,
)
from pipeline.ranges import (
    AT_LEAST_ONE,
    FRACTION,
    IMAGE_SIDE,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FRACTION,
    PRECISIONS,
    SEED,
    OneOf,
    Range,
    name_problems,
)
from trainer.config_experiments import CompareConfig, EfficiencyConfig, MaskRCNNConfig

# Allowed ranges (pipeline/ranges.py) of the keys pretrain and finetune share: the schedule, the
# optimiser and the input size. Checked when a section is loaded, naming the key.
_TRAINING_RANGES: dict[str, Range | OneOf] = {
    "precision": OneOf(PRECISIONS),
    "iters": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "clip_grad": NON_NEGATIVE,  # 0: no clipping
    "warmup_iters": NON_NEGATIVE,
    "warmup_ratio": FRACTION,
    "lr_steps": AT_LEAST_ONE,
    "lr_gamma": POSITIVE,
    "short_side": IMAGE_SIDE,
    "max_side": IMAGE_SIDE,
    "seed": SEED,
    "flip": FRACTION,
    "num_workers": NON_NEGATIVE,
    "log_every": AT_LEAST_ONE,
    "ckpt_every": AT_LEAST_ONE,
}


# The resampling factors trainer/model/pyramid.py can build (checked here so a bad
# model.pyramid_scales is a one-line config error, not a failure inside the model).
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)


@dataclass
class ModelConfig:
    """The query-based model: K-Net "s3" (docs/method.md stage two) or Mask2Former. Paper sizes by
    default. Mask2Former reads num_kernels (its queries), channels, num_heads and ffn_dim too."""

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        "num_kernels": AT_LEAST_ONE,
        "channels": AT_LEAST_ONE,
        "num_stages": AT_LEAST_ONE,
        "num_heads": AT_LEAST_ONE,
        "ffn_dim": AT_LEAST_ONE,
        "mask_threshold": FRACTION,
        "kernel_pooling": OneOf(("mean", "sum")),
        "kind": OneOf(("knet", "mask2former", "maskrcnn", "queryinst")),
        "decoder_layers": AT_LEAST_ONE,
        "pixel_decoder": OneOf(("deformable", "fpn")),
        "encoder_layers": NON_NEGATIVE,
        "encoder_ffn_dim": AT_LEAST_ONE,
        "encoder_points": AT_LEAST_ONE,
        "mask_loss": OneOf(("auto", "dense", "points")),
        "num_points": AT_LEAST_ONE,
        "oversample": Range(lo=1),
        "importance": FRACTION,
        "roi_samples": AT_LEAST_ONE,
        "test_score": OneOf(("auto", "class", "maskness")),
        "test_nms_iou": FRACTION,
        "criterion_form": OneOf(("mask2former", "knet")),
        "dii_stages": AT_LEAST_ONE,
        "dynamic_dim": AT_LEAST_ONE,
        "mask_convs": NON_NEGATIVE,
    }

    def cross_checks(self) -> list[str]:
        problems = []
        if self.channels % self.num_heads:
            problems.append(
                f"num_heads must divide channels ({self.channels}), got {self.num_heads}"
            )
        scales = [float(s) for s in self.pyramid_scales]
        if (
            len(scales) != 4
            or any(s not in PYRAMID_SCALES for s in scales)
            or any(a <= b for a, b in zip(scales, scales[1:]))
        ):
            problems.append(
                "pyramid_scales must be four decreasing factors from "
                f"{', '.join(f'{s:g}' for s in PYRAMID_SCALES)}, got {self.pyramid_scales}"
            )
        return problems

    num_kernels: int = 100
    channels: int = 256  # FPN width = kernel dimension
    num_stages: int = 3  # kernel-update stages
    num_heads: int = 8  # self-attention across kernels
    ffn_dim: int = 2048
    mask_threshold: float = 0.5  # binarisation before mask pooling
    # Pooling of features under a binarised mask (K^0 and every update stage): "mean" (this
    # project's choice: K^0 stays at the scale of the additive prompts) or "sum" (K-Net's code,
    # grows with mask area, which would make a prompt added to K^0 negligible).
    kernel_pooling: str = "mean"
    # Which model (trainer/model/factory.py): "knet", "mask2former", "queryinst", or "maskrcnn"
    # (torchvision's Mask R-CNN on the same backbone and neck, the CNN reference; [maskrcnn]).
    kind: str = "knet"
    # A ViT backbone's simple feature pyramid (trainer/model/pyramid.py): resampling factors of its
    # one stride-14 map, finest first; the finest level is the mask grid. ViTDet's (4, 2, 1, 0.5)
    # gives strides 3.5..28; (2, 1, 0.5, 0.25) gives 7..56, the same mask grid at twice the input
    # side, so a larger input adds ViT tokens per object without growing the head's cost.
    pyramid_scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    # Mask2Former only (trainer/model/mask2former/), the published sizes by default:
    decoder_layers: int = 9  # masked-attention decoder layers (three rounds over three scales)
    pixel_decoder: str = "deformable"  # multi-scale deformable-attention encoder, or "fpn"
    encoder_layers: int = 6  # deformable encoder layers of the pixel decoder
    encoder_ffn_dim: int = 1024
    encoder_points: int = 4  # sampling points per head and level
    # Mask costs and losses (trainer/criterion/point_sampling.py): "auto" = each model's published
    # choice (K-Net every cell, Mask2Former points), "dense" or "points" for either model.
    mask_loss: str = "auto"
    num_points: int = 12544  # 112 x 112: uniform for matching, importance-sampled for the losses
    oversample: float = 3.0
    importance: float = 0.75  # share of the points taken where the prediction is most uncertain
    # Mask R-CNN only (trainer/model/maskrcnn.py): RoIs sampled per image for its box and mask
    # losses, a quarter of them positive at most (torchvision's box_batch_size_per_image).
    roi_samples: int = 512
    # Inference of the query-based kinds (trainer/model/scoring.py): the detection score "class"
    # (class probability alone), "maskness" (times the mean foreground probability inside the
    # query's mask, as stage one ranks pseudo masks), or "auto" = the published choice (K-Net
    # class, Mask2Former maskness); and greedy mask NMS at this IoU after decoding (0: off, as
    # both models publish).
    test_score: str = "auto"
    test_nms_iou: float = 0.0
    # The set criterion's mask-cost and Dice forms (trainer/criterion/matcher.py, docs/method.md)
    # for either model: "mask2former" (mean-BCE mask cost, +1-smoothed Dice; what both models used
    # before the switch existed) or "knet" (K-Net's published linear mask cost and V-Net Dice with
    # squared terms, for the matching cost and the Dice loss). The mask loss stays BCE in both.
    criterion_form: str = "mask2former"
    # QueryInst only (trainer/model/queryinst/), the published sizes by default: dynamic instance
    # interaction stages, the hidden width of each query's generated convolution, and the 3 x 3
    # convolutions of its dynamic mask head.
    dii_stages: int = 6
    dynamic_dim: int = 64
    mask_convs: int = 4


@dataclass
class PretrainConfig:
    """Stage two: class-agnostic K-Net on pseudo masks, prompts and kernel supervision."""

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        **_TRAINING_RANGES,
        "prompt_slots": AT_LEAST_ONE,
        "prompt_keep": FRACTION,
        "ks_decorrelation": NON_NEGATIVE,
        "holdout": Range(lo=0, hi=0.5),
        "holdout_seed": SEED,
        "eval_every": NON_NEGATIVE,
        "pseudo_min_score": FRACTION,
        "pseudo_max_masks": NON_NEGATIVE,
        "pseudo_min_area": FRACTION,
        "drop_loss_iou": FRACTION,
        "eval_size": OneOf(("train", "teacher")),
        "ema_decay": Range(lo=0, hi=1, hi_open=True),
    }

    shards: str = ""  # empty = runs/<name>/proposals
    # Train on an unfinished proposals folder (missing or failed shards, a run still writing):
    # off, so such a folder is refused; --partial-shards sets it and config.toml records it.
    partial_shards: bool = False
    out: str = ""  # empty = runs/<name>/pretrain
    iters: int = 29572  # 12 epochs of COCO train2017 at batch 48
    batch_size: int = 6  # per process
    lr: float = 1e-4
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [19715, 27108])  # epochs 8 and 11
    lr_gamma: float = 0.1
    short_side: int = 800
    max_side: int = 1333
    flip: float = 0.1
    amp: bool = False  # older key: bf16 autocast on CUDA only; `precision` supersedes it
    # "fp32" or "bf16" autocast (CPU with native bf16, or CUDA; "fp16" on CUDA), for the frozen
    # backbone, the head and evaluation. docs/benchmarks.md measures it against fp32.
    precision: str = "fp32"
    compile: bool = False  # torch.compile (inductor) the head; docs/benchmarks.md
    num_workers: int = 2
    log_every: int = 20
    ckpt_every: int = 1000
    keep_checkpoints: int = 2  # newest iter_*.pt kept (<= 0: all); 2 so a bad last one has a twin
    seed: int = 0
    prompts: bool = True  # prompt-kernel matching (ablation switch)
    kernel_supervision: bool = True  # 1 - cos(K_n, t_l) (ablation switch)
    prompt_slots: int = 20
    prompt_keep: float = 0.9  # Bernoulli keep probability per kernel
    # Frozen-feature cache (trainer/data/feature_cache.py): the frozen backbone's levels, computed
    # once per (image, size, flip) and read back; exact. Empty dir = runs/<name>/feature-cache.
    feature_cache: bool = False
    feature_cache_dir: str = ""
    # Kernel-supervision target t_l (a remedy switch for the targets' collapse,
    # trainer/criterion/prompts.py):
    # "linear" (the paper: trainable Linear(S_l)), "detached" (that Linear, gradient stopped, so
    # only kernels move) or "frozen_orthogonal" (a fixed random orthogonal projection).
    ks_target: str = "linear"
    ks_decorrelation: float = 0.0  # weight of the mean squared pairwise cosine of the t_l
    # Pretext fit during pre-training (trainer/stages/pretext.py): a seeded share of the unlabelled
    # pool (by a hash of each file name, so the same on resume and across shard layouts) is held out
    # of training; every eval_every iterations the model is scored class-agnostically against those
    # images' pseudo masks, against the val ground truth when data.val_json is set, and the teacher
    # (the pseudo masks of teacher_val, stage one over the val images; default
    # runs/<name>/proposals-val when it exists) against the same ground truth.
    holdout: float = 0.05
    holdout_seed: int = 0
    eval_every: int = 1000
    teacher_val: str = ""
    # Which pseudo masks are targets (trainer/data/shard_dataset.py): at least this score, at most
    # this many per image (best first, 0: all) and at least this share of the image's area.
    pseudo_min_score: float = 0.0
    pseudo_max_masks: int = 0
    pseudo_min_area: float = 0.0
    # CutLER's DropLoss (trainer/criterion/drop_loss.py): an unmatched kernel whose predicted mask
    # has IoU below this with every pseudo mask gets no background class loss, at every stage with a
    # class loss; 0 = off (the paper's behaviour), CutLER uses 0.01.
    drop_loss_iou: float = 0.0
    # The input size of the pretext evaluation: "train" (short_side / max_side above) or
    # "teacher" (stage one's proposals.short_side / max_side), so that learner and teacher are
    # scored on the same images at the same resolution.
    eval_size: str = "train"
    # A pre-training checkpoint whose weights (the model and the kernel-supervision layers) start
    # this run, with a fresh optimiser, schedule and sampler: continue a pre-training with other
    # settings, e.g. a second phase at the teacher's input size. Empty: from the backbone alone.
    init: str = ""
    # Exponential moving average of the model's weights (trainer/engine/weight_average.py):
    # every evaluation scores it beside the trained weights ("ema_" keys), and the finished
    # checkpoint offers it to fine-tuning, evaluation and prediction. 0 = off.
    ema_decay: float = 0.0


@dataclass
class FinetuneConfig:
    """Stage three: K-Net with the dataset's classes on a labelled fraction."""

    RANGES: ClassVar[dict[str, Range | OneOf]] = {
        **_TRAINING_RANGES,
        "frac": POSITIVE_FRACTION,
        "split_seed": SEED,
        "split_fold": AT_LEAST_ONE,
        "backbone_lr_mult": NON_NEGATIVE,
        "frozen_stages": Range(lo=-1),  # -1: the whole backbone frozen
        "rotate_deg": Range(lo=0, hi=180),
        "rotate_prob": FRACTION,
        "test_mask_threshold": FRACTION,
        "max_detections": AT_LEAST_ONE,
        "multiscale": AT_LEAST_ONE,
    }

    frac: float = 0.05
    split_seed: int = 0
    split_file: str = ""  # Unbiased-Teacher COCO_supervision.txt; overrides frac/split_seed
    split_fold: int = 1
    # A checkpoint, "none" (the baseline), or empty = runs/<name>/pretrain/checkpoints/last.pt.
    init: str = ""
    out: str = ""  # empty = runs/<name>/finetune-<frac>[-<tag>]
    iters: int = 8501  # COCO 5%: 92 epochs of 5,914 images at batch 64
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    clip_grad: float = 4.0
    warmup_iters: int = 100
    warmup_ratio: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [6653, 8132])  # epochs 72 and 88
    lr_gamma: float = 0.1
    backbone_lr_mult: float = 0.25
    frozen_stages: int = 1  # stem and stage 1 frozen; -1 freezes the whole backbone
    short_side: int = 800
    max_side: int = 1333
    # Multi-scale training: short sides drawn per sample (max_side scaled with each); empty =
    # short_side only. Evaluation always uses short_side. The feature cache keeps one entry per
    # (image, size, flip), so a short list stays exact and cached.
    multiscale: list[int] = field(default_factory=list)
    flip: float = 0.5
    rotate_deg: float = 9.0
    rotate_prob: float = 0.5
    amp: bool = False  # older key, as in [pretrain]
    precision: str = "fp32"  # as in [pretrain]
    compile: bool = False
    num_workers: int = 2
    log_every: int = 20
    ckpt_every: int = 1000
    keep_checkpoints: int = 2  # newest iter_*.pt kept (<= 0: all)
    eval_every: int = 1000  # AP-vs-iteration curve
    seed: int = 0
    test_mask_threshold: float = 0.3
    max_detections: int = 100
    # Frozen-feature cache, as in [pretrain]: needs frozen_stages = -1 and no rotation (refused
    # otherwise); also serves evaluation. Directory empty = runs/<name>/feature-cache.
    feature_cache: bool = False
    feature_cache_dir: str = ""


@dataclass
class Config:
    """A whole experiment: every section of the TOML file."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    maskrcnn: MaskRCNNConfig = field(default_factory=MaskRCNNConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)

    def cross_checks(self) -> list[str]:
        return name_problems(self.name)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return from_dict(Config, read_toml(path, overrides))
