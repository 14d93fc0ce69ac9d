"""DINO projection head: MLP → bottleneck → L2 normalisation → weight-normalised linear layer to K."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g · v / ‖v‖ (row-wise), stored as ``weight_g``/``weight_v``.

    The key names are those of ``torch.nn.utils.weight_norm`` that the released DINO checkpoints use.
    The gain g starts at 1 (unit-norm rows); with ``fix_norm`` it stays there and is excluded from training
    (the paper's ``norm_last_layer``). v starts as ``nn.Linear``'s default weight, as in the original
    code: its norm (≈ 1/√3 per row) sets how far an optimiser step turns a row, so it is part of the recipe.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)
        self.fix_norm = fix_norm

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if rows >= self.weight_v.shape[1]:
            return F.linear(x, self.weight)
        # Fewer rows than input features (small batches, e.g. on a CPU): scale the [rows, K] output by
        # g / ‖v‖ instead of building the [K, in] normalised weight, whose elementwise passes (and their
        # backward) then cost more than the product itself. The same function, computed in another order.
        scale = (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)).squeeze(1)
        return F.linear(x, self.weight_v) * scale

    def extra_repr(self) -> str:
        out_dim, in_dim = self.weight_v.shape
        return f"in_dim={in_dim}, out_dim={out_dim}, fix_norm={self.fix_norm}"


class DINOHead(nn.Module):
    """``nlayers``-layer MLP (GELU, optional BN) to a bottleneck, L2-normalised, then to ``out_dim``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"head nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        # Without BN the linear layers sit at mlp.0 / mlp.2 / mlp.4, as in the released checkpoints.
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
