"""Dynamic instance interaction (Sparse R-CNN's and QueryInst's ``DynamicConv``).

Each query generates the weights of a two-layer 1x1 convolution, D -> F -> D, and applies it to
its own RoI features: feats (M, S, D) @ W_in (M, D, F) -> LayerNorm, ReLU -> @ W_out (M, F, D) ->
LayerNorm, ReLU. With ``flatten_size`` (the box branch) the S positions are then flattened and
projected to one D vector per query (Linear(S D -> D), LayerNorm, ReLU); without it (the mask
head) the output keeps its S positions.
"""

from __future__ import annotations

from torch import Tensor, nn


class DynamicConv(nn.Module):
    """Query-conditioned convolution of RoI features.

    Args:
        channels: D, the query and RoI feature width.
        dynamic_dim: F, the hidden width of the generated convolution (64 published).
        flatten_size: S = RoI side squared to flatten and project to D, or 0 to keep positions.
    """

    def __init__(self, channels: int, dynamic_dim: int, flatten_size: int = 0) -> None:
        super().__init__()
        self.channels, self.dynamic_dim = channels, dynamic_dim
        self.params = nn.Linear(channels, 2 * channels * dynamic_dim)
        self.norm_in = nn.LayerNorm(dynamic_dim)
        self.norm_out = nn.LayerNorm(channels)
        self.project: nn.Module | None = None
        if flatten_size:
            self.project = nn.Sequential(
                nn.Linear(channels * flatten_size, channels),
                nn.LayerNorm(channels),
                nn.ReLU(inplace=True),
            )

    def forward(self, queries: Tensor, feats: Tensor) -> Tensor:
        """queries (M, D), feats (M, S, D) -> (M, D) with flatten_size, else (M, S, D)."""
        d, f = self.channels, self.dynamic_dim
        params = self.params(queries)
        w_in = params[:, : d * f].view(-1, d, f)
        w_out = params[:, d * f :].view(-1, f, d)
        x = nn.functional.relu(self.norm_in(feats @ w_in))
        x = nn.functional.relu(self.norm_out(x @ w_out))
        if self.project is None:
            return x
        return self.project(x.flatten(1))
