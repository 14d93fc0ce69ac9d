"""Correctness checks that need a GPU (CI has none): run by ``gpu_suite.sh`` next to the speed benchmarks.

1. ``decode``: nvjpeg (batched ``decode_batch`` on CUDA) against PIL on the same JPEG files — mean and
   largest absolute pixel difference (the two decoders' IDCT and chroma upsampling differ slightly).
2. ``augment``: ``BatchMultiCrop`` on CUDA against the same module on the CPU over the same images, the
   random parameters drawn from the same seeded CPU generator (as the data path draws them) — so the
   views themselves are compared: mean and largest absolute difference (normalised units; only float
   arithmetic differs), besides shapes and per-view mean / standard deviation.
3. ``precision``: one DINO loss of a ViT-S/16 student/teacher pair on the same weights and crops in fp32
   and under bf16 autocast — relative difference.
4. ``compile``: the same losses over three training steps eager and with compiled backbones, with and
   without CUDA graphs (a 4-block ViT-tiny/16, fp32); stochastic depth draws new masks at every replay.
5. ``guard``: a step whose loss is NaN changes nothing with the fused AdamW on CUDA (device-side skip).

Each check reports its numbers and ``ok`` against a stated tolerance; a check that raises is reported with
its error and the others still run.

    python benchmarks/gpu_checks.py --jpegs /path/to/jpegs --out results/gpu_checks.json
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from _common import benchmark_parser, pick_device, report, student_teacher

from dino.data.gpu_augment import BatchMultiCrop
from dino.data.gpu_loader import decode_batch, decode_with_pil
from dino.loss import DINOLoss
from dino.models.backbones import build_backbone
from dino.teacher import ema_update
from dino.train.guard import NonFiniteGuard
from dino.train.optim import build_optimizer, set_schedules
from dino.train.setup import compile_backbones, uses_cuda_graphs


def pair(arch: str, patch: int, device: torch.device, out_dim: int = 4096, depth: int = 0):
    torch.manual_seed(0)  # no stochastic depth: the runs compared must see the same network
    return student_teacher(arch, patch, out_dim, device, depth=depth)


def crops(device: torch.device, batch: int = 16, locals_: int = 4) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    views = [torch.randn(batch, 3, 224, 224, generator=g) for _ in range(2)]
    views += [torch.randn(batch, 3, 96, 96, generator=g) for _ in range(locals_)]
    return [v.to(device) for v in views]


def dino_loss(student, teacher, views, out_dim: int, dtype: torch.dtype | None) -> float:
    loss_fn = DINOLoss(out_dim).to(views[0].device)
    device_type = views[0].device.type
    with (
        torch.no_grad(),
        torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        loss, _ = loss_fn(student(views), teacher(views[:2]), 0.04, update_center=False)
    return float(loss)


def check_decode(jpegs: Path, device: torch.device) -> dict:
    files = sorted(p for p in jpegs.rglob("*.jpg"))[:64]
    if not files:
        raise FileNotFoundError(f"no .jpg files under {jpegs}")
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    fast = decode_batch(encoded, device)
    diffs = []
    for data, image in zip(encoded, fast.images, strict=True):
        reference = decode_with_pil(memoryview(data.numpy())).to(device)
        if reference.shape != image.shape:
            raise AssertionError(
                f"shape {tuple(image.shape)} from nvjpeg vs {tuple(reference.shape)} from PIL"
            )
        diffs.append((image.int() - reference.int()).abs().float())
    mean = float(torch.stack([d.mean() for d in diffs]).mean())
    worst = float(max(d.max() for d in diffs))
    return {"files": len(files), "failed": len(fast.failed), "mean_abs_diff": mean, "max_abs_diff": worst,
            "ok": not fast.failed and mean < 1.5}  # fmt: skip


def check_augment(jpegs: Path, device: torch.device) -> dict:
    files = sorted(p for p in jpegs.rglob("*.jpg"))[:256]
    images = [decode_with_pil(p.read_bytes()) for p in files]
    augment = BatchMultiCrop(local_crops_number=4)
    stats, views = {}, {}
    for where in ("cpu", device.type):
        dev = torch.device(where) if where == "cpu" else device
        module = augment.to(dev)
        gen = torch.Generator().manual_seed(0)  # on the CPU for both: the same parameters
        views[where] = module([img.to(dev) for img in images], gen)
        stats[where] = [
            {"shape": list(v.shape), "mean": float(v.mean()), "std": float(v.std()),
             "min": float(v.min()), "max": float(v.max())}
            for v in views[where]
        ]  # fmt: skip
    cpu, gpu = stats["cpu"], stats[device.type]
    shapes_ok = [c["shape"] for c in cpu] == [g["shape"] for g in gpu]
    mean_gap = max(abs(c["mean"] - g["mean"]) for c, g in zip(cpu, gpu, strict=True))
    std_ratio = max(max(c["std"], g["std"]) / min(c["std"], g["std"]) for c, g in zip(cpu, gpu, strict=True))
    diffs = (
        [(c - g.cpu()).abs() for c, g in zip(views["cpu"], views[device.type], strict=True)]
        if shapes_ok
        else []
    )
    mean_diff = max(float(d.mean()) for d in diffs) if diffs else None
    max_diff = max(float(d.max()) for d in diffs) if diffs else None
    # One 8-bit gray level is 1 / 255 / std ~ 0.017 in normalised units.
    ok = shapes_ok and mean_diff is not None and mean_diff < 2e-3 and mean_gap < 0.01 and std_ratio < 1.01
    return {"images": len(images), "views": stats, "shapes_equal": shapes_ok, "largest_mean_gap": mean_gap,
            "largest_std_ratio": std_ratio, "mean_abs_diff": mean_diff, "max_abs_diff": max_diff,
            "ok": ok}  # fmt: skip


def check_precision(device: torch.device) -> dict:
    student, teacher = pair("vit_small" if device.type == "cuda" else "vit_tiny", 16, device)
    views = crops(device)
    fp32 = dino_loss(student, teacher, views, 4096, None)
    bf16 = dino_loss(student, teacher, views, 4096, torch.bfloat16)
    rel = abs(bf16 - fp32) / abs(fp32)
    return {"fp32_loss": fp32, "bf16_loss": bf16, "relative_diff": rel, "ok": rel < 2e-2}


def train_losses(student, teacher, views, steps: int, graphs: bool) -> list[float]:
    """Losses of ``steps`` fp32 training steps (DINO loss, AdamW, EMA teacher) on fixed views."""
    loss_fn = DINOLoss(4096).to(views[0].device)
    optimizer = build_optimizer(student, "adamw")
    set_schedules(optimizer, 1e-3, 0.04)
    losses = []
    for _ in range(steps):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            t_out = teacher(views[:2])
        loss, _ = loss_fn(student(views), t_out, 0.04)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(teacher, student, 0.99)
        losses.append(float(loss.detach()))
    return losses


def check_compile(device: torch.device) -> dict:
    """Three training steps eager and with compiled backbones (``default`` and ``reduce-overhead``, the
    latter replaying CUDA graphs on a GPU) give the same losses."""
    torch._dynamo.reset()
    views = crops(device, batch=8, locals_=2)
    results: dict = {}
    depth = 4  # fewer blocks compile faster; the graphs have the same kinds of operators
    eager = train_losses(*pair("vit_tiny", 16, device, depth=depth), views, 3, graphs=False)
    results["eager_losses"] = eager
    for mode in ("default", "reduce-overhead"):
        student, teacher = pair("vit_tiny", 16, device, depth=depth)
        compile_backbones(student, teacher, mode)
        losses = train_losses(student, teacher, views, 3, graphs=uses_cuda_graphs(mode))
        results[f"{mode}_losses"] = losses
        results[f"{mode}_largest_relative_diff"] = max(
            abs(c - e) / abs(e) for c, e in zip(losses, eager, strict=True)
        )
    results["ok"] = all(results[f"{m}_largest_relative_diff"] < 1e-3 for m in ("default", "reduce-overhead"))
    return results


def check_compile_drop_path(device: torch.device) -> dict:
    """Stochastic depth in a backbone replayed as a CUDA graph draws new masks at every replay (the same
    input and weights give different outputs each time).

    The gradients are dropped before each backward pass, as the training loop's ``zero_grad(set_to_none=
    True)`` does. The first version of this check let them accumulate across replays, and on an H200 (torch
    2.11, 2026-11-27) its backward failed with "accessing tensor output of CUDAGraphs that has been
    overwritten by a subsequent run", because a parameter's first ``.grad`` is the backward graph's output
    buffer itself, which the next replay overwrites (PyTorch issue 169545: gradient accumulation across
    CUDA-graph replays); with the gradients dropped it passed on an H200 later that day. The
    training loop accumulates no gradients across steps."""
    torch._dynamo.reset()
    views = crops(device, batch=8, locals_=2)
    torch.manual_seed(0)
    backbone, _ = build_backbone("vit_tiny", 16, 224, 0.5, 4)
    compiled = torch.compile(backbone.to(device).train(), dynamic=False, mode="reduce-overhead")
    outputs = []
    for _ in range(4):  # the first two calls warm up and record; the last two replay
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(views[0])
        compiled.zero_grad(set_to_none=True)
        out.sum().backward()
        outputs.append(out.detach().clone())
    fresh = all(not torch.equal(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1 :])
    return {"stochastic_depth_differs_per_replay": fresh, "ok": fresh}


def check_guard(device: torch.device) -> dict:
    student, teacher = pair("vit_tiny", 16, device, out_dim=1024)
    optimizer = build_optimizer(student, "adamw")
    guard = NonFiniteGuard(optimizer, device, 5, on_bad_step=lambda *a: None, divergence_message=str)
    loss_fn = DINOLoss(1024).to(device)
    views = crops(device, batch=4, locals_=2)
    before = [p.detach().clone() for p in student.parameters()] + [
        p.detach().clone() for p in teacher.parameters()
    ]
    center = loss_fn.center.clone()
    loss, _ = loss_fn(student(views), teacher(views[:2]), 0.04, update_center=False)
    loss = loss * float("nan")
    guard.admit(0, loss)
    loss_fn.update_center(teacher(views[:2]).detach(), skip=guard.mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema_update(teacher, student, 0.99, guard.mask)
    after = [p.detach() for p in student.parameters()] + [p.detach() for p in teacher.parameters()]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    center_unchanged = torch.equal(center, loss_fn.center)
    bad = guard.poll()
    return {"on_device": guard.on_device, "weights_unchanged": unchanged, "center_unchanged": center_unchanged,
            "bad_steps_polled": bad, "ok": guard.on_device and unchanged and center_unchanged and bad == 1}  # fmt: skip


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--jpegs", type=Path, required=True, help="a folder of JPEG files")
    parser.add_argument(
        "--checks",
        default="decode,augment,precision,guard,compile,compile_drop_path",
        help="which checks to run",
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    if device.type != "cuda":  # the comparisons are then CPU against CPU: only checks that the script runs
        print("no GPU: a smoke run of the checks on the CPU (ViT-tiny in the precision check)")
    checks = {
        "decode": lambda: check_decode(args.jpegs, device),
        "augment": lambda: check_augment(args.jpegs, device),
        "precision": lambda: check_precision(device),
        "guard": lambda: check_guard(device),
        "compile": lambda: check_compile(device),
        "compile_drop_path": lambda: check_compile_drop_path(device),
    }
    unknown = set(args.checks.split(",")) - set(checks)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(checks)}")
    body: dict = {}
    for name, check in checks.items():
        if name not in args.checks.split(","):
            continue
        try:
            body[name] = check()
        except Exception as exc:  # report and go on: one broken check must not hide the others
            body[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
            }
        print(name, {k: v for k, v in body[name].items() if k not in ("views", "trace")}, flush=True)
    table = [{"check": name, "ok": result["ok"]} for name, result in body.items()]
    report("gpu_checks", device, body, table, args.out)


if __name__ == "__main__":
    main()
