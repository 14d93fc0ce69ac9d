"""Model-only DINO training step: images/s and peak memory on synthetic tensors.

One step = teacher forward on the global crops, student forward/backward on all crops, the DINO loss,
AdamW, the EMA teacher update — the same work the training loop does, without the data pipeline.
``--variants`` picks what is measured, side by side in one process (see ``make_step``):

- ``ours``: what ``dino train`` does by default (eager);
- ``step``: ``dino train``'s step itself (:class:`dino.train.trainer.TrainingStep`): ``ours`` with what the
  loop adds around it — the non-finite-loss guard, the BatchNorm keeper, the schedules, the center update;
- ``compiled``: ``ours`` with ``torch.compile`` (``--compile-mode``, ``--compile-scope``), as
  ``run.compile=true`` (``run.compile_mode=reduce-overhead`` adds CUDA graphs);
- ``plain``: our code the simple way (explicit-softmax attention, unfused AdamW, fp16 + grad scaler on a
  GPU, a host sync per step);
- ``original``: the original DINO architecture, from a copy of its ``vision_transformer.py`` given with
  ``--original PATH`` (this project does not ship it), with the original loop's habits.

Speed-ups are reported against ``plain`` and ``original``. ``--flops`` also counts each variant's
floating-point operations per image (PyTorch's ``FlopCounterMode``: matrix products, convolutions,
attention) and sets the achieved rate against a large dense matrix product in the step's precision on the
same device — how far a variant is from what the hardware can do, and the ceiling of any speed-up that
keeps the arithmetic. ``--rounds N`` measures every variant N times,
interleaved and in alternating order, and reports medians (a CPU shared with other work drifts by ±10 %).
Peak memory counts everything the step holds from the models' creation on, CUDA-graph pools included.

    python benchmarks/train_step.py --arch vit_small --patch 16 --batch 8 --out results/train_step.json
    python benchmarks/train_step.py --variants compiled,ours,plain --compile-mode reduce-overhead  # GPU
    python benchmarks/train_step.py --arch vit_tiny --patch 4 --global-size 32 --local-size 16 \\
        --local-crops 6 --batch 64 --out-dim 4096 --variants ours,original --original /path/to/vision_transformer.py
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from _common import (
    add_model_arguments,
    benchmark_parser,
    pick_device,
    report,
    save_partial,
    student_teacher,
    sync,
)
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dino.config import COMPILE_MODES, load_config
from dino.devices import resolve_precision
from dino.loss import DINOLoss
from dino.models.multicrop import MultiCropWrapper
from dino.models.vision_transformer import VIT_SIZES
from dino.teacher import ema_update, init_teacher
from dino.train.optim import build_optimizer, clip_gradients, param_groups, set_schedules
from dino.train.setup import compile_backbones, uses_cuda_graphs
from dino.train.trainer import TrainingStep


def build(args: argparse.Namespace, device: torch.device, plain: bool, compiled: bool = False):
    student, teacher = student_teacher(
        args.arch, args.patch, args.out_dim, device, 0.1, args.depth, args.global_size, not plain
    )
    if args.activation_checkpointing:  # in both variants: the memory saving is what is measured
        student.backbone.activation_checkpointing = True
    if compiled and args.compile_scope == "model":
        for wrapper in (student, teacher):  # in place: the modules and their state-dict keys stay the same
            wrapper.compile(dynamic=False, mode=args.compile_mode)
    elif compiled:
        compile_backbones(student, teacher, args.compile_mode)
    return student, teacher


def build_original(args: argparse.Namespace, device: torch.device):
    """Student and teacher from a copy of the original DINO ``vision_transformer.py`` (its ViT and head),
    in our multi-crop wrapper (the same grouping of crops by resolution as the original's)."""
    spec = importlib.util.spec_from_file_location("original_dino_vit", args.original)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--original {args.original}: not a Python file")
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)

    embed_dim, depth, heads = VIT_SIZES[args.arch.removeprefix("vit_")]

    def model(drop_path: float) -> MultiCropWrapper:
        # The same network as ours: the size's width and heads, --depth blocks, position embeddings for
        # the global crops (the original's arch functions fix 12 blocks and 224 px).
        backbone = original.VisionTransformer(
            img_size=[args.global_size], patch_size=args.patch, embed_dim=embed_dim, depth=args.depth or depth,
            num_heads=heads, mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            drop_path_rate=drop_path,
        )  # fmt: skip
        return MultiCropWrapper(backbone, original.DINOHead(backbone.embed_dim, args.out_dim))

    student = model(0.1).to(device)
    return student, init_teacher(model(0.0).to(device), student)


def clip_each_tensor_checked(model: torch.nn.Module, max_norm: float) -> None:
    """Per-tensor clipping as the original training loop does it: one norm and one host-side check each."""
    for p in model.parameters():
        if p.grad is not None:
            coef = max_norm / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


@torch.no_grad()
def ema_each_tensor(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """The EMA teacher update as the original loop does it: a Python loop over the parameters."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_((1 - momentum) * s.detach())


def make_step(args: argparse.Namespace, device: torch.device, variant: str) -> Callable[[], torch.Tensor]:
    """One training step of ``variant`` on fixed random crops, as a function returning the loss.

    ``ours``: what ``dino train`` does; ``compiled``: the same with ``torch.compile``. ``plain``: our code
    the simple way — explicit-softmax attention,
    PyTorch's default (unfused) AdamW, fp16 autocast with a grad scaler on a GPU (fp32 on the CPU), eager, the
    loss read every step. ``original``: the original architecture (``--original``) with the original
    loop's habits — PyTorch's default AdamW, per-tensor clipping and EMA in Python loops, fp16 + grad
    scaler on a GPU, the loss read every step."""
    torch.manual_seed(0)
    if variant == "step":
        return training_loop_step(args, device)
    plain = variant in ("plain", "original")
    precision = resolve_precision(
        ("fp16" if device.type == "cuda" else "fp32") if plain else args.precision, device
    )
    if variant == "original":
        student, teacher = build_original(args, device)
        optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, weight_decay=0.0)
        clip, ema = clip_each_tensor_checked, ema_each_tensor
    else:
        student, teacher = build(args, device, plain, compiled=variant == "compiled")
        optimizer = build_optimizer(student, "adamw", fused=not plain)
        clip, ema = clip_gradients, ema_update
    loss_fn = DINOLoss(args.out_dim).to(device)
    set_schedules(optimizer, 1e-4, 0.04)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    crops = random_crops(args, device)

    graphs = variant == "compiled" and uses_cuda_graphs(args.compile_mode)

    def step() -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # one training step = one CUDA-graph generation
        with torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast):
            with torch.no_grad():
                t_out = teacher(crops[:2])
            loss, _ = loss_fn(student(crops), t_out, 0.04)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip(student, 3.0)
        scaler.step(optimizer)
        scaler.update()
        ema(teacher, student, 0.996)
        if plain:
            float(
                loss.detach()
            )  # a host synchronisation every step, as a loop that checks the loss each time
        return loss

    return step


def random_crops(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """Two global views and ``--local-crops`` local ones, ``--batch`` images each, of random pixels."""
    b = args.batch
    crops = [torch.randn(b, 3, args.global_size, args.global_size, device=device) for _ in range(2)]
    crops += [
        torch.randn(b, 3, args.local_size, args.local_size, device=device) for _ in range(args.local_crops)
    ]
    return crops


def training_loop_step(args: argparse.Namespace, device: torch.device) -> Callable[[], torch.Tensor]:
    """The ``step`` variant: ``dino train``'s :class:`~dino.train.trainer.TrainingStep` on the models of
    ``ours`` (drop path 0.1 on the student, the paper's head to ``--out-dim``, clipping at 3), built from a
    configuration, after the last layer's frozen epoch."""
    cfg = load_config(
        None,
        [f"model.arch={args.arch}", f"model.patch_size={args.patch}", f"model.depth={args.depth}",
         "model.drop_path_rate=0.1", f"model.activation_checkpointing={args.activation_checkpointing}",
         f"head.out_dim={args.out_dim}", f"data.global_crop_size={args.global_size}",
         f"data.local_crop_size={args.local_size}", f"data.local_crops_number={args.local_crops}",
         f"run.batch_size={args.batch}", f"run.precision={args.precision}", "optim.clip_grad=3.0"],
    )  # fmt: skip
    training_step = TrainingStep.from_config(cfg, device)
    crops = random_crops(args, device)

    def step() -> torch.Tensor:
        return training_step.step(crops, iteration=1, epoch=cfg.head.freeze_last_layer)[0]

    return step


def measure(args: argparse.Namespace, device: torch.device, variant: str) -> dict:
    """Images/s of ``variant``'s step (see ``make_step``) after ``--warmup`` steps, and its peak memory.

    The peak is counted from before the models are built, not after the warm-up: CUDA graphs allocate
    their memory pool while they are recorded and never again, so a peak reset after the warm-up would
    miss it. ``peak_reserved_gib`` is what the caching allocator held (pools and cached blocks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(args, device, variant)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss.detach())  # wait for the device
    elapsed = time.perf_counter() - start
    gpu = device.type == "cuda"
    result = {
        "images_per_s": args.steps * args.batch / elapsed,
        "seconds_per_step": elapsed / args.steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if gpu else None,
    }
    del step, loss
    torch._dynamo.reset()  # compiled graphs and their CUDA-graph pools go with the variant
    return result


def count_flops(args: argparse.Namespace, device: torch.device, variant: str) -> float:
    """Floating-point operations of one step of ``variant`` per image, as ``FlopCounterMode`` counts them
    (matrix products, convolutions and attention; elementwise work is not counted). The compiled variant
    does the arithmetic of ``ours`` and is counted eagerly as that."""
    step = make_step(args, device, "ours" if variant == "compiled" else variant)
    step()  # the first step creates the optimizer state
    with flop_counter() as counter:
        step()
    return counter.get_total_flops() / args.batch


def _cpu_flash_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts the fused attention kernel of CPUs: PyTorch counts SDPA's GPU
    kernels (flash, memory-efficient, cuDNN) but not ``_scaled_dot_product_flash_attention_for_cpu`` and
    its backward, so fused attention on a CPU would count as free. Counted with PyTorch's formulas for the
    GPU kernels: 2 products forward, 5 backward (the scores are recomputed), where explicit attention
    does 2 and 4."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward,
        },
    )


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> dict:
    """FLOP/s of a large square matrix product in ``dtype`` on ``device`` (8192² on a GPU, 4096² on a CPU):
    about the most this device's dense arithmetic reaches, the yardstick of ``--flops``."""
    size = 8192 if device.type == "cuda" else 4096
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (library initialisation, GPU clocks)
    sync(device)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        if device.type == "cuda" and runs % 10:
            continue
        sync(device)
    sync(device)
    elapsed = time.perf_counter() - start
    return {"gflop_per_s": 2 * size**3 * runs / elapsed / 1e9, "shape": f"{size}x{size}x{size}",
            "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


def step_matmul_rate(args: argparse.Namespace, device: torch.device) -> dict:
    """``matmul_rate`` in the precision of ``ours``' step."""
    precision = resolve_precision(args.precision, device)
    return matmul_rate(device, precision.autocast_dtype if precision.autocast else torch.float32)


def flops_report(
    args: argparse.Namespace, device: torch.device, body: dict, variants: list[str], rates: list[dict]
) -> None:
    """Add ``--flops``'s counts to ``body``: per variant GFLOP per image, the achieved GFLOP/s, its fraction
    of the median of the ``rates`` measured between rounds (a shared machine's clock moves: the rate is
    measured with the steps, not once) and the images/s that rate would give if every counted operation
    ran at it."""
    gflops = sorted(r["gflop_per_s"] for r in rates)
    rate = rates[0] | {"gflop_per_s": gflops[(len(gflops) - 1) // 2], "rounds_gflop_per_s": gflops}
    body["matmul_rate"] = rate
    for name in variants:
        per_image = count_flops(args, device, name) / 1e9
        achieved = per_image * body[name]["images_per_s"]
        body[name] |= {
            "gflop_per_image": per_image,
            "achieved_gflop_per_s": achieved,
            "fraction_of_matmul_rate": achieved / rate["gflop_per_s"],
            "images_per_s_at_matmul_rate": rate["gflop_per_s"] / per_image,
        }


VARIANTS = ("ours", "step", "compiled", "plain", "original")


def add_step_arguments(parser: argparse.ArgumentParser, batch: int = 8) -> None:
    """What defines the measured step: model, crops, batch, precision, compile, activation checkpointing."""
    add_model_arguments(parser)
    parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0: the size's standard depth)")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile mode of the compiled variant (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--compile-scope",
        default="backbone",
        choices=["backbone", "model"],
        help="compile the backbones (as dino train does) or backbone + head over all crops",
    )
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute the student's ViT blocks"
    )


def main() -> None:
    parser = benchmark_parser(__doc__)
    add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--variants", default="ours,plain", help="comma-separated: ours, step, compiled, plain, original"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every variant this many times, interleaved; report medians",
    )
    parser.add_argument(
        "--flops",
        action="store_true",
        help="count each variant's operations per image and compare the achieved rate with a large matmul",
    )
    parser.add_argument(
        "--original",
        type=Path,
        help="a copy of the original DINO vision_transformer.py (not shipped here), for the original variant",
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    body = {"config": vars(args) | {"out": str(args.out) if args.out else None,
                                    "original": str(args.original) if args.original else None}}  # fmt: skip
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "original" in variants and args.original is None:
        parser.error("the original variant needs --original PATH (a copy of DINO's vision_transformer.py)")
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    rates: list[dict] = []
    for r in range(args.rounds):  # every other round in reverse order: no variant always runs first
        for name in variants if r % 2 == 0 else variants[::-1]:
            rounds[name].append(measure(args, device, name))
            save_partial("train_step", device, body | {"rounds": rounds}, args.out)  # kept if killed
        if args.flops:
            rates.append(step_matmul_rate(args, device))
    for name, results in rounds.items():
        median = sorted(results, key=lambda m: m["images_per_s"])[(len(results) - 1) // 2]
        body[name] = median | {"rounds_images_per_s": [m["images_per_s"] for m in results]}
    for reference in ("plain", "original"):
        if reference in body:
            body[f"speedup_vs_{reference}"] = {
                name: body[name]["images_per_s"] / body[reference]["images_per_s"]
                for name in ("ours", "step", "compiled")
                if name in body
            }
    if args.flops:
        flops_report(args, device, body, variants, rates)
    table = [
        {"variant": key, "images/s": body[key]["images_per_s"], "peak GiB": body[key]["peak_memory_gib"],
         "reserved GiB": body[key]["peak_reserved_gib"]}
        | ({"GFLOP/image": body[key]["gflop_per_image"], "GFLOP/s": body[key]["achieved_gflop_per_s"],
            "of matmul rate": body[key]["fraction_of_matmul_rate"]} if args.flops else {})
        for key in variants
    ]  # fmt: skip
    report("train_step", device, body, table, args.out)


if __name__ == "__main__":
    main()
