"""Runs a backbone on multi-crop views, one forward per resolution, and the head once on all of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def group_by_resolution(crops: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Index ranges ``[start, end)`` of consecutive crops sharing a spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops; output rows are ordered crop by crop: [crop0 batch, crop1 batch, …]."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(crops, Tensor):
            crops = [crops]
        features = [self.backbone(torch.cat(list(crops[a:b]))) for a, b in group_by_resolution(crops)]
        return self.head(torch.cat(features))
