"""Saliency prompts, prompt-kernel matching and kernel supervision (docs/method.md stage two).

Prompts. For pseudo mask l with box b_l (input pixels, x1/y1 exclusive), P_l is the mean of the
coarsest pyramid level P5 over the cells the box covers on P5's grid (stride read from the model:
32 ResNet, 28 ViT). The box maps to cells [floor(x0/s), ceil(x1/s)) x [floor(y0/s), ceil(y1/s));
a degenerate box (covering no cell: zero width or height exactly on a cell edge) is widened to
2 cells (one each side of that edge), then clipped to the grid. Prompts are detached.

Slots. Each image has ``slots`` (20) prompt slots: with L prompts, each is repeated floor(20/L)
times, then the first 20 mod L once more. **[choice]** With L > 20, the first 20 are used (the
shards store masks sorted by score, so these are the 20 most salient). L = 0: no valid slot.

Prompt-kernel matching. E_{n,s} = cos(K^0_n, slot s) over valid slots; delta(n) = argmax_s E;
K^0_n <- K^0_n + keep_n * P_delta(n), keep_n ~ Bernoulli(keep) per image and kernel. Repeated
slots carry identical prompts, so the argmax picks the same prompt as over the L distinct ones.
No gradient flows through the argmax or the prompt; images without prompts are untouched.

Kernel supervision. t_l = Linear(Cs -> D)(S_l), trainable. At each update stage i, every kernel n
that the stage's Hungarian assignment pairs with mask l adds 1 - cos(K^i_n, t_l); the stage's loss
is the mean over its matched pairs, weight ``LOSS_WEIGHTS["kernel_sup"]``; the engine sums stages.
**[choice]** Pairs come from the assignment, not index order (the authors' code mismatched them).

Target collapse remedies (switches; the paper's trainable Linear stays the default). The targets'
mean pairwise cosine ("target_spread", logged as stat_target_spread) rises toward 1 when the
trainable Linear is free to move every t_l toward the kernels. ``target="detached"`` keeps the
Linear but stops the gradient at t_l, so only kernels move (the Linear stays at its random init);
``"frozen_orthogonal"`` replaces it by a fixed random projection with orthonormal rows (a buffer,
saved in checkpoints, never trained), which preserves the seeds' own angles up to the projection.
``decorrelation`` > 0 adds weight * mean over pairs i != j of cos(t_i, t_j)^2 (trainable Linear
only: with fixed targets it would have nothing to move).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.criterion.losses import LOSS_WEIGHTS
from trainer.criterion.matcher import Assignment


def grid_boxes(boxes: Tensor, stride: float, height: int, width: int) -> Tensor:
    """boxes: (L, 4) x0, y0, x1, y1 input pixels -> (L, 4) int64 cells [cx0, cy0, cx1, cy1) on a
    (height, width) grid of the given stride, at least one cell each."""
    b = boxes.detach().double() / stride
    lo = b[:, :2].floor()
    hi = b[:, 2:].ceil()
    degenerate = hi <= lo  # widen by 2 cells: one each side of the (empty) position
    lo = torch.where(degenerate, lo - 1, lo)
    hi = torch.where(degenerate, lo + 2, hi)  # [old lo - 1, old lo + 1): 2 cells
    limits = torch.tensor([width, height], dtype=b.dtype, device=b.device)
    lo = torch.minimum(lo.clamp(min=0), limits - 1)
    hi = torch.maximum(torch.minimum(hi, limits), lo + 1)
    return torch.cat([lo, hi], dim=1).long()


def box_prompts(level: Tensor, boxes: list[Tensor], stride: float) -> list[Tensor]:
    """level: (B, D, h, w) the coarsest pyramid level; boxes: B tensors (L_b, 4) input pixels.
    Returns B detached tensors (L_b, D): the mean of ``level`` inside each box's cells."""
    level = level.detach()
    _, d, h, w = level.shape
    prompts = []
    for b, bx in enumerate(boxes):
        if bx.shape[0] == 0:
            prompts.append(level.new_zeros((0, d)))
            continue
        cells = grid_boxes(bx, stride, h, w)
        # Integral image (float64 so box sums stay exact to float32 precision).
        integral = F.pad(level[b].double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (D, h+1, w+1)
        x0, y0, x1, y1 = cells.unbind(1)
        sums = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
        area = ((x1 - x0) * (y1 - y0)).to(sums.dtype)
        prompts.append((sums / area).T.to(level.dtype))
    return prompts


def slot_indices(num_prompts: int, slots: int) -> Tensor:
    """The prompt index held by each slot: (slots,) int64, or (0,) when there is no prompt.

    L <= slots: each prompt floor(slots/L) times, then the first slots mod L once more;
    L > slots: the first ``slots`` prompts."""
    if num_prompts == 0:
        return torch.empty(0, dtype=torch.int64)
    if num_prompts > slots:
        return torch.arange(slots)
    base = torch.arange(num_prompts).repeat_interleave(slots // num_prompts)
    return torch.cat([base, torch.arange(slots % num_prompts)])


def fill_slots(prompts: list[Tensor], slots: int) -> tuple[Tensor, Tensor]:
    """prompts: B tensors (L_b, D) -> slot prompts (B, slots, D) (zeros where invalid) and
    source (B, slots) int64: the prompt index in each slot, -1 for an invalid slot."""
    d = prompts[0].shape[1]
    device = prompts[0].device
    out = prompts[0].new_zeros((len(prompts), slots, d))
    source = torch.full((len(prompts), slots), -1, dtype=torch.int64, device=device)
    for b, p in enumerate(prompts):
        idx = slot_indices(p.shape[0], slots).to(device)
        out[b, : len(idx)] = p[idx]
        source[b, : len(idx)] = idx
    return out, source


class PromptKernelMatching(nn.Module):
    """K^0 + prompts. No parameters.

    Args:
        slots: prompt slots per image (20).
        keep: Bernoulli keep probability per image and kernel (0.9).
        generator: optional torch.Generator for the Bernoulli draws (tests); global RNG if None.
    """

    def __init__(
        self, slots: int = 20, keep: float = 0.9, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if slots < 1 or not 0.0 <= keep <= 1.0:
            raise ValueError(f"bad prompt settings: slots={slots}, keep={keep}")
        self.slots = slots
        self.keep = keep
        self.generator = generator

    def forward(
        self, kernels: Tensor, level: Tensor, boxes: list[Tensor], stride: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """kernels: (B, N, D) K^0; level: (B, D, h, w) P5; boxes: B tensors (L_b, 4) input
        pixels; stride: P5's stride.

        Returns K^0' (B, N, D) and detached scalar stats (only when some image has prompts):
        "prompt_cos" mean over kernels of max_s E, "prompt_drop" fraction of kernels given no
        prompt, "prompt_distinct" mean number of distinct prompts received per image.
        """
        batch, num_kernels, _ = kernels.shape
        with torch.no_grad():
            slot_prompts, source = fill_slots(box_prompts(level, boxes, stride), self.slots)
            valid = source >= 0  # (B, S)
            has_prompts = valid.any(dim=1)  # (B,)
            if not bool(has_prompts.any()):
                return kernels, {}
            sim = F.normalize(kernels.detach().float(), dim=-1) @ F.normalize(
                slot_prompts.float(), dim=-1
            ).transpose(1, 2)  # (B, N, S) cosine E
            sim = sim.masked_fill(~valid[:, None, :], -math.inf)
            best, delta = sim.max(dim=-1)  # (B, N)
            chosen = torch.gather(
                slot_prompts, 1, delta[..., None].expand(-1, -1, slot_prompts.shape[-1])
            )  # (B, N, D) P_delta(n)
            gen = self.generator
            probs = torch.full(
                (batch, num_kernels), self.keep, device=gen.device if gen else kernels.device
            )
            keep = torch.bernoulli(probs, generator=gen).to(kernels.device)
            keep = keep * has_prompts[:, None].to(keep.dtype)
            addition = (keep[..., None] * chosen).to(kernels.dtype)

            rows = has_prompts
            kept = keep[rows] > 0
            received = torch.gather(source, 1, delta)[rows]  # prompt index per kernel
            distinct = [float(r[k].unique().numel()) for r, k in zip(received, kept)]
            stats = {
                "prompt_cos": best[rows].mean(),
                "prompt_drop": 1.0 - kept.float().mean(),
                "prompt_distinct": torch.tensor(sum(distinct) / len(distinct)),
            }
        return kernels + addition, stats


TARGET_KINDS = ("linear", "detached", "frozen_orthogonal")


class KernelSupervision(nn.Module):
    """t_l = Linear(Cs -> D)(S_l); per update stage, mean over matched pairs of 1 - cos(K^i_n, t_l).

    Args:
        seed_dim: Cs, the seed embedding width (backbone.embed_dim: 2048 ResNet, 384 ViT-S).
        kernel_dim: D.
        weight: loss weight (``LOSS_WEIGHTS["kernel_sup"]``).
        target: one of TARGET_KINDS (see the module docstring).
        decorrelation: weight of the targets' mean squared pairwise cosine (0 = off).
    """

    def __init__(
        self,
        seed_dim: int,
        kernel_dim: int,
        weight: float | None = None,
        target: str = "linear",
        decorrelation: float = 0.0,
    ) -> None:
        super().__init__()
        if target not in TARGET_KINDS:
            raise ValueError(f"ks_target must be one of {', '.join(TARGET_KINDS)}, got {target!r}")
        if decorrelation < 0 or (decorrelation > 0 and target != "linear"):
            raise ValueError(
                f"ks_decorrelation={decorrelation} needs a value >= 0, and > 0 only with "
                f"ks_target='linear' (got '{target}': its targets have no trainable parameter)"
            )
        self.target = target
        self.decorrelation = decorrelation
        if target == "frozen_orthogonal":
            basis = torch.empty(kernel_dim, seed_dim)
            nn.init.orthogonal_(basis)  # orthonormal rows (or columns when D > Cs)
            self.register_buffer("basis", basis)
        else:
            self.proj = nn.Linear(seed_dim, kernel_dim)
        self.weight = LOSS_WEIGHTS["kernel_sup"] if weight is None else weight

    def targets(self, seeds: Tensor) -> Tensor:
        """(L, Cs) seeds S_l -> (L, D) targets t_l (no graph to any parameter unless "linear")."""
        if self.target == "frozen_orthogonal":
            return seeds.to(self.basis.dtype) @ self.basis.T
        t = self.proj(seeds.to(dtype=self.proj.weight.dtype))
        return t.detach() if self.target == "detached" else t

    def forward(
        self,
        stage_kernels: list[Tensor],
        assignments: list[list[Assignment]],
        seeds: list[Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """stage_kernels: S tensors (B, N, D) K^i; assignments: S lists of B (kernel_idx,
        target_idx) pairs, the ones update stage i's losses used; seeds: B tensors (L_b, Cs).

        Returns {"loss_s{i}_kernel": weighted scalar} for i = 1..S (0 with the graph kept when a
        stage has no pair) and {"target_spread": mean pairwise cosine of the t_l in the batch}
        (omitted with fewer than two targets).
        """
        if len(stage_kernels) != len(assignments):
            raise ValueError(f"{len(stage_kernels)} stages but {len(assignments)} assignments")
        device = stage_kernels[0].device
        targets = [self.targets(s.to(device=device)) for s in seeds]
        all_t = torch.cat(targets).float()  # (T, D)
        losses = {}
        for i, (kernels, assign) in enumerate(zip(stage_kernels, assignments), start=1):
            k = torch.cat([kernels[b, rows] for b, (rows, _) in enumerate(assign)]).float()
            t = torch.cat([targets[b][cols] for b, (_, cols) in enumerate(assign)]).float()
            if k.shape[0] == 0:
                loss = kernels.float().sum() * 0.0 + all_t.sum() * 0.0
            else:
                loss = (1.0 - F.cosine_similarity(k, t, dim=-1)).mean()
            losses[f"loss_s{i}_kernel"] = self.weight * loss
        if self.decorrelation > 0:
            losses["loss_ks_decorrelation"] = self.decorrelation * _mean_squared_cosine(all_t)
        stats = {}
        if all_t.shape[0] >= 2:
            with torch.no_grad():
                unit = F.normalize(all_t, dim=-1)
                cos = unit @ unit.T
                n = cos.shape[0]
                stats["target_spread"] = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
        return losses, stats


def _mean_squared_cosine(vectors: Tensor) -> Tensor:
    """Mean over pairs i != j of cos(v_i, v_j)^2 (0 with the graph kept for fewer than two)."""
    n = vectors.shape[0]
    if n < 2:
        return vectors.sum() * 0.0
    unit = F.normalize(vectors, dim=-1)
    cos = unit @ unit.T
    off = cos - torch.diag_embed(cos.diagonal())
    return off.pow(2).sum() / (n * (n - 1))
