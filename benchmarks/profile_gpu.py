"""Where the time of a training step and of the batched augmentation goes: torch.profiler tables.

For each part (``step``: the model-only training step of a ``train_step.py`` variant; ``augment``:
``BatchMultiCrop`` on a decoded batch) it reports the wall time per iteration, the time the device spent in
kernels per iteration (busy fraction = kernel time / wall time: well below 1 means the host — Python,
dispatch, synchronisations — sets the pace), the number of kernels launched and of host-device
synchronisations, the operators dispatched per iteration (counted at the dispatcher, one per call from
Python or autograd: the host work a GPU waits on when it is not busy), and the operators taking the most
device and host time. ``--group-views`` renders the augmentation's same-size views together (the GPU path)
also on a CPU. ``augment_ops`` (not in the default parts) counts the augmentation's operators per batch on
images without data (the "meta" device), split into what would run on the images' device (kernels,
views) and on the host: the same counts on any machine, a GPU's kernel launches measured on a CPU.

    python benchmarks/profile_gpu.py --jpegs /path/to/jpegs --out results/profile.json   # writes .txt too
    python benchmarks/profile_gpu.py --parts augment_ops --batch 64 --out results/augment_ops.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import train_step
from _common import benchmark_parser, pick_device, report, sync
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from dino.data.gpu_augment import BatchMultiCrop
from dino.data.gpu_loader import decode_with_pil


def summarise(prof, iterations: int, wall: float, device: torch.device) -> tuple[dict, str]:
    events = prof.key_averages()
    on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.device_time for e in on_device)  # kernels and copies on the device
    # A read of a device value is one aten::_local_scalar_dense (aten::item calls it, and the runtime's
    # cudaStreamSynchronize is inside it), so count those, plus the explicit device syncs made outside
    # such a read (torch.cuda.synchronize: the runtime's cudaDeviceSynchronize).
    reads = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
    syncs = reads + sum(e.count for e in events if e.key == "cudaDeviceSynchronize")
    body = {
        "iterations": iterations,
        "wall_ms_per_iteration": 1e3 * wall / iterations,
        "device_ms_per_iteration": kernel_us / 1e3 / iterations,
        "device_busy_fraction": (kernel_us / 1e6) / wall if wall else None,
        "kernels_per_iteration": len(on_device) / iterations,
        "host_syncs_per_iteration": syncs / iterations,
        "aten_ops_per_iteration": sum(e.count for e in events if e.key.startswith("aten::")) / iterations,
    }
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = (
        events.table(sort_by=sort, row_limit=30)
        + "\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=20)
    )
    return body, text


class _CountOpsByDevice(TorchDispatchMode):
    """Counts the operators that touch ``device`` (kernels there, views apart) and the others (host)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.counts = {"device_kernels": 0, "device_views": 0, "host": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        if any(isinstance(t, torch.Tensor) and t.device.type == self.device for t in leaves):
            self.counts["device_views" if func.is_view else "device_kernels"] += 1
        else:
            self.counts["host"] += 1
        return out


def run_profiled(fn, iterations: int, device: torch.device):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(3):
        fn()
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        sync(device)
        wall = time.perf_counter() - start
    body, text = summarise(prof, iterations, wall, device)
    with _CountOpsByDevice(device.type) as counter:
        fn()
    return body | {"dispatched_ops_per_iteration": sum(counter.counts.values())}, text


def count_augment_ops(args: argparse.Namespace, device: torch.device) -> tuple[dict, str]:
    """The batched augmentation's operators per batch, on images that live on the "meta" device (shapes,
    no data): those touching the images' device are what a GPU runs as kernels (or views); the rest run
    on the host. Any read of a device value would raise, so a result also shows that none is made.
    Independent of the hardware: the same counts on any machine."""
    files = sorted(args.jpegs.rglob("*.jpg"))[: args.batch] if args.jpegs else []
    shapes = [tuple(decode_with_pil(p.read_bytes()).shape) for p in files] or [(3, 375, 500)] * args.batch
    images = [torch.empty(shape, dtype=torch.uint8, device="meta") for shape in shapes]
    augment = BatchMultiCrop(local_crops_number=args.local_crops).to("meta")
    generator = torch.Generator().manual_seed(0)
    augment(images, generator, group_views=True)  # first call: caches made once per device
    with _CountOpsByDevice("meta") as counter:
        augment(images, generator, group_views=True)
    body = {"images": len(images), "distinct_shapes": len(set(shapes)), **counter.counts}
    return body, f"operators per batch of {len(images)}: {counter.counts}"


def profile_step(args: argparse.Namespace, device: torch.device) -> tuple[dict, str]:
    return run_profiled(train_step.make_step(args, device, args.variant), args.iterations, device)


def profile_augment(args: argparse.Namespace, device: torch.device) -> tuple[dict, str]:
    files = sorted(args.jpegs.rglob("*.jpg"))[: args.batch]
    images = [decode_with_pil(p.read_bytes()).to(device) for p in files]
    augment = BatchMultiCrop(local_crops_number=args.local_crops).to(device)
    generator = torch.Generator().manual_seed(0)  # on the CPU, as the data path draws
    if args.group_views:
        return run_profiled(lambda: augment(images, generator, group_views=True), args.iterations, device)
    return run_profiled(lambda: augment(images, generator), args.iterations, device)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--parts", default="step,augment")
    parser.add_argument("--jpegs", type=Path, help="a folder of JPEG files (for the augment part)")
    train_step.add_step_arguments(parser, batch=64)
    parser.add_argument(
        "--variant", default="ours", choices=["ours", "compiled", "plain"], help="step variant"
    )
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument(
        "--group-views",
        action="store_true",
        help="augmentation: render same-size views together (the GPU path)",
    )
    args = parser.parse_args()
    parts = {"step": profile_step, "augment": profile_augment, "augment_ops": count_augment_ops}
    chosen = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(chosen) - set(parts))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(parts)}")
    if "augment" in chosen and (args.jpegs is None or not any(args.jpegs.rglob("*.jpg"))):
        parser.error("--parts augment profiles real JPEG files: pass --jpegs DIR (a folder of .jpg files)")
    device = pick_device(args.device)
    body, texts = {}, []
    for name in chosen:
        body[name], text = parts[name](args, device)
        texts.append(f"## {name}\n{text}")
        print(name, body[name], flush=True)
    table = [{"part": name, **values} for name, values in body.items()]
    report("profile_gpu", device, body, table, args.out)
    print("\n".join(texts))
    if args.out:
        args.out.with_suffix(".txt").write_text("\n".join(texts))


if __name__ == "__main__":
    main()
