"""Optimiser step time: fused AdamW (our default, CUDA and CPU) against PyTorch's multi-tensor AdamW.

The parameters and gradients of a DINO student (backbone + head, random gradients); each variant's step
is timed after one warm-up step.

    python benchmarks/optimizer_step.py --arch vit_small --patch 16 --out-dim 65536
"""

from __future__ import annotations

import time

import torch
from _common import add_model_arguments, benchmark_parser, pick_device, report, sync

from dino.models.backbones import build_backbone
from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropWrapper
from dino.train.optim import build_optimizer, set_schedules


def main() -> None:
    parser = benchmark_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = pick_device(args.device)
    backbone, dim = build_backbone(args.arch, args.patch, 224, 0.0, 0)
    model = MultiCropWrapper(backbone, DINOHead(dim, args.out_dim)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    rows = []
    for fused in (True, False):
        optimizer = build_optimizer(model, "adamw", fused=fused)
        set_schedules(optimizer, 1e-4, 0.04)
        optimizer.step()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        sync(device)
        rows.append({"adamw": "fused" if fused else "multi-tensor",
                     "seconds_per_step": (time.perf_counter() - start) / args.steps})  # fmt: skip
    body = {
        "config": vars(args) | {"out": str(args.out)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "results": rows,
        "speedup": rows[1]["seconds_per_step"] / rows[0]["seconds_per_step"],
    }
    report("optimizer_step", device, body, rows, args.out)


if __name__ == "__main__":
    main()
