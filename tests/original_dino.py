"""The original DINO code's training state, built as its ``main_dino.py`` builds it (not with our code
paths): the formulas of its ``utils.cosine_scheduler`` and ``utils.get_params_groups`` written out, its
head's layout (``nn.utils.weight_norm``: ``weight_g`` registered before ``weight_v``), the DDP ``module.``
prefix on the student, AdamW steps with numpy float64 ``lr`` / ``weight_decay``, and its save dict.

Only the backbone is ours: its parameter names and order are the released ViT's.
"""

from __future__ import annotations

import argparse
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dino.models.vision_transformer import vit


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """The original ``utils.cosine_scheduler``, formula for formula."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)  # end point included
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def get_params_groups(model: nn.Module) -> list[dict]:
    """The original ``utils.get_params_groups``: trainable parameters in registration order, biases and
    1-D parameters without weight decay."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or len(param.shape) == 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class OriginalHead(nn.Module):
    """The original ``DINOHead`` (no BN): mlp.0/2/4 linear layers, then a weight-normed last layer."""

    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        with warnings.catch_warnings():  # deprecated in favour of parametrizations; the original uses it
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1, p=2))


class OriginalWrapper(nn.Module):
    """``utils.MultiCropWrapper``'s attributes (backbone, head), one resolution at a time."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


class DistributedLike(nn.Module):
    """What ``DistributedDataParallel`` adds to the names: the ``module.`` prefix."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@dataclass
class OriginalRun:
    """A run of the original code after ``epochs_done`` epochs, as it stands when it saves."""

    checkpoint: dict  # main_dino.py's save dict
    student: DistributedLike
    optimizer: torch.optim.Optimizer
    args: argparse.Namespace
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    momentum_schedule: np.ndarray
    niter_per_ep: int

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The objective the steps here follow (any differentiable function of the head's output serves:
        only the optimiser's state is under test)."""
        out = model(x)
        weights = torch.linspace(-1.0, 1.0, out.shape[-1])
        return (out * weights).sum() + out.pow(2).mean()

    def step(self, it: int, x: torch.Tensor, epoch: int) -> None:
        """One step of the original's loop: numpy lr / weight decay into the groups, last layer frozen
        during the first ``freeze_last_layer`` epochs."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr_schedule[it]
            if i == 0:
                group["weight_decay"] = self.wd_schedule[it]
        self.optimizer.zero_grad()
        self.loss(self.student, x).backward()
        if epoch < self.args.freeze_last_layer:
            for name, p in self.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        self.optimizer.step()


def original_args(**changes) -> argparse.Namespace:
    """main_dino.py's arguments (its defaults, then ``changes``), with those init_distributed_mode adds."""
    args = dict(
        arch="vit_tiny", patch_size=4, out_dim=64, norm_last_layer=True, momentum_teacher=0.996,
        use_bn_in_head=False, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
        use_fp16=True, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size_per_gpu=64,
        epochs=100, freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-6, optimizer="adamw",
        drop_path_rate=0.1, global_crops_scale=(0.4, 1.0), local_crops_number=8,
        local_crops_scale=(0.05, 0.4), data_path="/path/to/imagenet/train/", output_dir=".",
        saveckp_freq=20, seed=0, num_workers=10, dist_url="env://", local_rank=0, rank=0, world_size=1, gpu=0,
    )  # fmt: skip
    args.update(changes)
    return argparse.Namespace(**args)


def original_run(
    *,
    img: int = 16,
    depth: int = 2,
    hidden: int = 32,
    bottleneck: int = 16,
    niter_per_ep: int = 2,
    epochs_done: int = 2,
    batch: int = 3,
    draw_seed: int = 0,
    **arg_changes,
) -> OriginalRun:
    """Build the original's student and teacher, train ``epochs_done`` epochs of ``niter_per_ep`` AdamW
    steps on random images (drawn from ``draw_seed``) and return the run with the checkpoint main_dino.py
    would write then; ``arg_changes`` change its arguments."""
    args = original_args(**arg_changes)
    g = torch.Generator().manual_seed(draw_seed)
    torch.manual_seed(draw_seed)
    size = args.arch.removeprefix("vit_")

    def build() -> OriginalWrapper:
        backbone = vit(size, patch_size=args.patch_size, img_size=img, depth=depth)
        head = OriginalHead(backbone.embed_dim, args.out_dim, hidden, bottleneck, args.norm_last_layer)
        return OriginalWrapper(backbone, head)

    inner, teacher = build(), build()
    teacher.load_state_dict(inner.state_dict())  # as main_dino.py starts the teacher
    for p in teacher.parameters():
        p.requires_grad = False
    student = DistributedLike(inner)
    optimizer = torch.optim.AdamW(get_params_groups(student))
    world = args.world_size
    run = OriginalRun(
        checkpoint={},
        student=student,
        optimizer=optimizer,
        args=args,
        lr_schedule=cosine_scheduler(
            args.lr * (args.batch_size_per_gpu * world) / 256.0,
            args.min_lr,
            args.epochs,
            niter_per_ep,
            warmup_epochs=args.warmup_epochs,
        ),
        wd_schedule=cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep),
        momentum_schedule=cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter_per_ep),
        niter_per_ep=niter_per_ep,
    )
    for epoch in range(epochs_done):
        for i in range(niter_per_ep):
            it = niter_per_ep * epoch + i
            run.step(it, torch.randn(batch, 3, img, img, generator=g), epoch)
            with torch.no_grad():  # the teacher's EMA
                m = run.momentum_schedule[it]
                for q, k in zip(inner.parameters(), teacher.parameters(), strict=True):
                    k.data.mul_(m).add_((1 - m) * q.detach().data)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    run.checkpoint = {
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epochs_done,  # epoch + 1 after the last finished epoch
        "args": args,
        "dino_loss": {"center": torch.randn(1, args.out_dim, generator=g)},
    }
    if args.use_fp16:
        run.checkpoint["fp16_scaler"] = scaler.state_dict()
    return run


def save_as_numpy1(checkpoint: dict, path: Path) -> None:
    """``torch.save`` as under numpy 1 (the released files): numpy numbers pickled with the module path
    ``numpy.core.multiarray`` where numpy 2 writes ``numpy._core.multiarray``."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            target.writestr(info, data)
