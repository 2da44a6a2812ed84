"""DINOv2 ViT-S/14 as a frozen, batch-invariant backbone: padded tokens masked in attention, the
position embedding interpolated per image, so an image's features do not depend on its batch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.backbones.backbone import Backbone, Sizes
from pipeline.backbones.vit_weights import (
    read_vit_checkpoint,
)
from pipeline.backbones.weight_files import LoadReport


def _masked_block(block: nn.Module, x: Tensor, key_mask: Tensor) -> Tensor:
    """One timm pre-norm ``Block`` with some tokens excluded as attention keys.

    x (B,N,C); key_mask (B,1,1,N) bool, True where a token may be attended to (broadcast over
    heads and queries). The block's own modules run in the order of timm's Block/Attention
    forward; it is written out because timm 1.0.x blocks before ~1.0.20 take no mask.
    """
    attn = block.attn
    y = block.norm1(x)
    b, n, _ = y.shape
    gate = getattr(attn, "gate", None)  # newer timm only; None for DINOv2
    g = gate(y).sigmoid() if gate is not None else None
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = attn.attn_drop.p if attn.training else 0.0
    # Every query keeps at least the class token as a key, so no softmax row is all -inf.
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
    y = y.transpose(1, 2).reshape(b, n, -1)
    post = getattr(attn, "norm", None)  # scale_norm (newer timm); Identity for DINOv2
    if post is not None:
        y = post(y)
    if g is not None:
        y = y * g
    y = attn.proj_drop(attn.proj(y))
    x = x + block.drop_path1(block.ls1(y))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class DinoV2ViTS14(Backbone):
    """timm ViT-S/14 (DINOv2 layout, no register tokens); one level: last block tokens, stride 14.

    ``pos_grid`` is the side of the stored position-embedding grid (37 for DINOv2's 518 px).

    Batch invariant: given ``sizes``, each image gets the position embedding of its own grid
    (ceil(H_i/14), ceil(W_i/14)), placed top-left in the padded grid, and its padded tokens are
    excluded as attention keys. Its valid cells then equal a run of that image alone (to float
    rounding); its padded cells hold unspecified values. Without ``sizes``, or when every image
    fills the padded grid, the plain (unmasked, faster) forward runs.
    """

    name = "dinov2_vits14"
    embed_dim = 384
    saliency_stride = 14
    level_channels = (384,)
    level_strides = (14.0,)
    size_divisor = 14
    batch_invariant = True

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

    @staticmethod
    def _image_grids(
        sizes: Sizes | None, shape: tuple[int, ...], h: int, w: int
    ) -> list[tuple[int, int]] | None:
        """Each image's patch grid (ceil(H_i/14), ceil(W_i/14)); None when ``sizes`` is None or
        every grid is the whole h x w grid (the unmasked path gives the per-image result then).

        ``shape`` is the input's (B,3,H,W) before padding to 14; sizes must fit inside it.
        """
        if sizes is None:
            return None
        b, _, height, width = shape
        if len(sizes) != b:
            raise ValueError(f"sizes has {len(sizes)} entries for a batch of {b} images")
        grids = []
        for hi, wi in sizes:
            if not (0 < hi <= height and 0 < wi <= width):
                raise ValueError(f"image size {hi}x{wi} does not fit the {height}x{width} batch")
            grids.append((-(-int(hi) // 14), -(-int(wi) // 14)))
        if all(g == (h, w) for g in grids):
            return None
        return grids

    def _padded_position_embedding(self, grids: list[tuple[int, int]], h: int, w: int) -> Tensor:
        """(B, 1+h*w, C): image i's own (gh_i, gw_i) embedding top-left of the h x w grid, with
        its class-token entry first; zeros on padded cells (their tokens are never attended to)."""
        cache: dict[tuple[int, int], Tensor] = {}
        rows = []
        for gh, gw in grids:
            if (gh, gw) not in cache:
                cache[gh, gw] = self._position_embedding(gh, gw)[0]  # (1+gh*gw, C)
            pe = cache[gh, gw]
            c = pe.shape[-1]
            grid = F.pad(pe[1:].reshape(gh, gw, c), (0, 0, 0, w - gw, 0, h - gh))
            rows.append(torch.cat([pe[:1], grid.reshape(h * w, c)]))
        return torch.stack(rows)

    def tokens(self, x: Tensor, sizes: Sizes | None = None) -> Tensor:
        """x (B,3,H,W) -> (B, 1+h*w, 384) tokens after the final norm (class token first).

        H and W are zero-padded bottom/right to multiples of 14 first (as ``pad_batch`` would),
        so h = ceil(H/14), w = ceil(W/14). ``sizes`` [(H_i, W_i)]: valid pixels of each image of
        a padded batch (see the class docstring); tokens of padded cells are then unspecified.
        """
        shape = tuple(x.shape)
        pad_h, pad_w = (-x.shape[-2]) % 14, (-x.shape[-1]) % 14
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        vit = self.vit
        x = vit.patch_embed(x)  # (B,h,w,C): dynamic_img_size keeps the grid shape
        b, h, w, c = x.shape
        x = torch.cat([vit.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        grids = self._image_grids(sizes, shape, h, w)
        if grids is None:  # every image fills the grid: plain forward
            x = vit.pos_drop(x + self._position_embedding(h, w))
            x = vit.norm_pre(x)
            x = vit.blocks(x)
            return vit.norm(x)
        x = vit.pos_drop(x + self._padded_position_embedding(grids, h, w))
        x = vit.norm_pre(x)
        valid = torch.zeros(b, h, w, dtype=torch.bool, device=x.device)
        for i, (gh, gw) in enumerate(grids):
            valid[i, :gh, :gw] = True
        cls = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        key_mask = torch.cat([cls, valid.reshape(b, h * w)], dim=1)[:, None, None, :]
        for block in vit.blocks:
            x = _masked_block(block, x, key_mask)
        return vit.norm(x)

    def saliency_features(self, x: Tensor, sizes: Sizes | None = None) -> Tensor:
        """x (B,3,H,W) -> last block patch tokens after the norm, (B,384,ceil(H/14),ceil(W/14)).

        With ``sizes``, image i's cells [:ceil(H_i/14), :ceil(W_i/14)] equal its run alone."""
        h, w = -(-x.shape[-2] // 14), -(-x.shape[-1] // 14)
        t = self.tokens(x, sizes)[:, 1:]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def forward(self, x: Tensor, sizes: Sizes | None = None) -> list[Tensor]:
        """x (B,3,H,W) -> [(B,384,H/14,W/14)] (the single level K-Net's simple pyramid expands);
        ``sizes`` as in ``saliency_features``."""
        return [self.saliency_features(x, sizes)]


def load_vit_checkpoint(path: str | Path) -> tuple[DinoV2ViTS14, LoadReport]:
    """Build a ViT-S/14 from a Meta DINOv2, Hugging Face Dinov2 or timm-layout checkpoint."""
    model = DinoV2ViTS14()
    expected = {k: v.shape for k, v in model.vit.state_dict().items()}
    state, report = read_vit_checkpoint(path, expected)
    # The position embedding's grid is square (checked by the reader); DINOv2's own is 37x37.
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid != 37:
        model = DinoV2ViTS14(pos_grid=grid)
    model.vit.load_state_dict(state, strict=True)
    return model, report
