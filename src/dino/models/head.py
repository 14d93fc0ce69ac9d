"""DINO projection head: MLP → bottleneck → L2 normalisation → weight-normalised linear layer to K.

The appendix's head studies are options: GELU or ReLU in the MLP, the L2-normalised bottleneck on or off,
and a predictor MLP on the student only (BYOL-style), between its MLP and the normalisation.
"""

from __future__ import annotations

import math
from typing import Literal

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


HeadActivation = Literal["gelu", "relu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def mlp(dims: list[int], use_bn: bool, activation: HeadActivation) -> nn.Module:
    """Linear layers through ``dims`` with (BN and) the activation between them, none after the last;
    truncated-normal weights (std 0.02) and zero biases. One layer is returned bare."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"head activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(_ACTIVATIONS[activation]())
    for module in layers:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class DINOHead(nn.Module):
    """``nlayers``-layer MLP (GELU, optional BN) to a bottleneck, L2-normalised, then to ``out_dim``.

    ``predictor_hidden_dim`` > 0 adds a predictor (bottleneck → hidden → bottleneck, BN as the MLP) after
    the MLP: the student's head in the paper's predictor ablation. ``l2_bottleneck=False`` passes the
    bottleneck to the last layer without normalising it.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        activation: HeadActivation = "gelu",
        l2_bottleneck: bool = True,
        predictor_hidden_dim: int = 0,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"head nlayers must be >= 1, got {nlayers}")
        # Without BN the linear layers sit at mlp.0 / mlp.2 / mlp.4, as in the released checkpoints.
        self.mlp = mlp([in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim], use_bn, activation)
        self.predictor = (
            mlp([bottleneck_dim, predictor_hidden_dim, bottleneck_dim], use_bn, activation)
            if predictor_hidden_dim > 0
            else None
        )
        self.l2_bottleneck = l2_bottleneck
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        if self.predictor is not None:
            x = self.predictor(x)
        if self.l2_bottleneck:
            x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
