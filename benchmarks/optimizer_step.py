"""Optimiser step time: fused AdamW (our default, CUDA and CPU) against the multi-tensor (``foreach``) AdamW
and PyTorch's default AdamW (multi-tensor on CUDA, a loop over the tensors on the CPU).

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
from dino.train.optim import build_optimizer, param_groups, set_schedules


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
    variants = {
        "fused": lambda: build_optimizer(model, "adamw", fused=True),
        "multi-tensor": lambda: torch.optim.AdamW(
            param_groups(model), lr=0.0, weight_decay=0.0, foreach=True
        ),
        "pytorch-default": lambda: build_optimizer(model, "adamw", fused=False),
    }
    rows = []
    for name, make in variants.items():
        optimizer = make()
        set_schedules(optimizer, 1e-4, 0.04)
        optimizer.step()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        sync(device)
        rows.append({"adamw": name, "seconds_per_step": (time.perf_counter() - start) / args.steps})
    body = {
        "config": vars(args) | {"out": str(args.out)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "results": rows,
        "speedup_vs_multi_tensor": rows[1]["seconds_per_step"] / rows[0]["seconds_per_step"],
        "speedup_vs_pytorch_default": rows[2]["seconds_per_step"] / rows[0]["seconds_per_step"],
    }
    report("optimizer_step", device, body, rows, args.out)


if __name__ == "__main__":
    main()
