"""One QueryInst stage: the dynamic instance interaction head (box branch) and the dynamic mask
head, after mmdetection's ``DIIHead`` and ``DynamicMaskHead``.

Box branch: self-attention across the N queries (+ residual, LayerNorm) gives the stage's
attended queries; a dynamic convolution of each query's 7 x 7 RoI features by the query
(+ residual, LayerNorm) and an FFN (+ residual, LayerNorm) give the stage's new query; from it one
fully connected layer (no bias, LayerNorm, ReLU) to the class logits and three to the box deltas.
Mask branch: the attended query convolves its 14 x 14 mask RoI features dynamically (no
projection), then four 3 x 3 convolutions, a 2x transposed convolution and a 1 x 1 logit layer
give a 28 x 28 class-agnostic mask inside the box (one mask per query, as the model contract
needs; the published head predicts one per class and reads the labelled one).
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.model.queryinst.dynamic_conv import DynamicConv

BOX_ROI = 7
MASK_ROI = 14


def _fcs(channels: int, count: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU()]
    return nn.Sequential(*layers)


class InteractionHead(nn.Module):
    """Queries (B, N, D) + their RoI features -> new queries, attended queries, box deltas.
    The class layer lives outside (``QueryInst.class_heads``) so fine-tuning can skip it."""

    def __init__(self, channels: int, heads: int, ffn_dim: int, dynamic_dim: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.interaction = DynamicConv(channels, dynamic_dim, flatten_size=BOX_ROI * BOX_ROI)
        self.interaction_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, channels)
        )
        self.ffn_norm = nn.LayerNorm(channels)
        self.cls_fcs = _fcs(channels, 1)
        self.reg_fcs = _fcs(channels, 3)
        self.fc_reg = nn.Linear(channels, 4)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # [choice] The last box layer starts at zero (as Deformable DETR's box head; mmdetection
        # leaves it Xavier): every stage first keeps its input box, so no query starts outside
        # the image, where RoIAlign reads zeros and its mask head learns nothing.
        nn.init.zeros_(self.fc_reg.weight)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, queries: Tensor, roi_feats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """queries (B, N, D); roi_feats (B * N, D, 7, 7) -> new queries (B, N, D), attended
        queries (B, N, D), class features (B, N, D), box deltas (B, N, 4)."""
        batch, num, d = queries.shape
        attended = self.attention_norm(queries + self.attention(queries, queries, queries)[0])
        feats = roi_feats.flatten(2).transpose(1, 2)  # (B * N, 49, D)
        interacted = self.interaction(attended.reshape(-1, d), feats).view(batch, num, d)
        new = self.interaction_norm(attended + interacted)
        new = self.ffn_norm(new + self.ffn(new))
        return new, attended, self.cls_fcs(new), self.fc_reg(self.reg_fcs(new))


class DynamicMaskHead(nn.Module):
    """Attended queries (M, D) + mask RoI features (M, D, 14, 14) -> (M, 28, 28) mask logits."""

    def __init__(self, channels: int, dynamic_dim: int, num_convs: int = 4) -> None:
        super().__init__()
        self.interaction = DynamicConv(channels, dynamic_dim)
        convs: list[nn.Module] = []
        for _ in range(num_convs):
            convs += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, 1, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, queries: Tensor, roi_feats: Tensor) -> Tensor:
        num, d, size, _ = roi_feats.shape
        feats = roi_feats.flatten(2).transpose(1, 2)  # (M, S, D)
        x = self.interaction(queries, feats).transpose(1, 2).reshape(num, d, size, size)
        x = self.upsample(self.convs(x)).relu()
        return self.logits(x)[:, 0]
