"""End to end: ``dino train`` from JPEG files, images/s in the steady state, ours next to a plain setup.

Each variant is a real ``dino train`` run (a subprocess) over ``--images`` JPEGs for ``--epochs`` epochs;
the rate is read from its ``log.jsonl``: iterations between the first and the last log point of each epoch
over the time between them, so start-up, worker start and the end-of-epoch checkpoint are left out.

- ``ours``: JPEG bytes read by workers, decoded on the device in batches (nvjpeg on a GPU) and augmented
  there (``data.augment_on=device``), bf16 on GPUs that have it, fused AdamW, no per-step host sync.
- ``plain``: the paper's PIL pipeline in ``--workers`` loader processes (``data.augment_on=workers``), fp16
  with a grad scaler on a GPU (fp32 on the CPU) — the original recipe's set-up in our code.
- ``compiled`` (``--variants compiled,ours,plain``): ``ours`` with ``run.compile=true
  run.compile_mode=reduce-overhead`` (compiled backbones replayed as CUDA graphs).

Without ``--data`` the images are ImageNet-sized JPEGs made once from the CIFAR-10 copy in
``../shared/data`` (upscaled to 500×375, see ``_common.imagenet_sized_jpegs``).

    python benchmarks/end_to_end.py --device cuda --workers 16 --out results/end_to_end_gpu.json
    python benchmarks/end_to_end.py --config cifar_small --data src/dino/data/sample/cifar10/train \\
        --images 1024 --batch 64 --workers 2      # a CPU-sized check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import benchmark_parser, imagenet_sized_jpegs, pick_device, report

VARIANTS = {
    "ours": lambda gpu: ["data.augment_on=device", "run.precision=auto"],
    "compiled": lambda gpu: [
        "data.augment_on=device",
        "run.precision=auto",
        "run.compile=true",
        "run.compile_mode=reduce-overhead",
    ],
    "plain": lambda gpu: ["data.augment_on=workers", f"run.precision={'fp16' if gpu else 'fp32'}"],
}


def subset(root: Path, count: int, dest: Path) -> Path:
    """The first ``count`` images of ``root`` (sorted, all classes) as links under ``dest``."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg"})
    if len(files) < count:
        sys.exit(f"{root} has {len(files)} JPEG files; --images asks for {count}")
    for f in files[:count]:
        target = dest / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    return dest


def steady_rate(log_file: Path, images_per_step: int) -> dict:
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    iters = [r for r in records if r["type"] == "iter"]
    steps = seconds = 0.0
    for epoch in sorted({r["epoch"] for r in iters}):
        mine = [r for r in iters if r["epoch"] == epoch]
        if len(mine) >= 2:
            steps += mine[-1]["iteration"] - mine[0]["iteration"]
            seconds += mine[-1]["time"] - mine[0]["time"]
    if not steps:
        raise RuntimeError(f"{log_file}: too few log points for a steady-state rate; raise --images")
    peak = max((r.get("peak_memory_gib") or 0.0) for r in iters)
    return {"steady_images_per_s": steps * images_per_step / seconds, "steps_timed": int(steps),
            "seconds_timed": seconds, "peak_memory_gib": peak or None}  # fmt: skip


def run_variant(args: argparse.Namespace, name: str, data: Path, gpu: bool, work: Path) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "dino.cli", "train", "--config", args.config, "--data", str(data),
           "--output", str(out), "--no-resume", f"run.epochs={args.epochs}", f"run.batch_size={args.batch}",
           f"run.log_every={args.log_every}", "run.progress_bar=never", "run.save_every_epochs=0",
           f"data.num_workers={args.workers}", f"run.device={args.device}", "monitor.collapse=false",
           *VARIANTS[name](gpu), *args.overrides]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return {"variant": name, "overrides": VARIANTS[name](gpu), **steady_rate(out / "log.jsonl", args.batch)}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--config", default="vit_small_100ep")
    parser.add_argument("--data", type=Path, help="JPEG folder (default: ImageNet-sized JPEGs made once)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "dino-bench")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--log-every", type=int, default=8)
    parser.add_argument("--variants", default="ours,plain")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every variant")
    args = parser.parse_args()
    device = pick_device(args.device)
    args.device = str(device)
    gpu = device.type == "cuda"
    source = args.data or imagenet_sized_jpegs(args.scratch / "imagenet-sized", args.images)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch if args.scratch.is_dir() else None) as tmp:
        data = subset(source, args.images, Path(tmp) / "data")
        for name in args.variants.split(","):
            rows.append(run_variant(args, name.strip(), data, gpu, Path(tmp)))
    body = {
        "config": vars(args) | {"data": str(source), "scratch": str(args.scratch), "out": str(args.out)},
        "data": "ImageNet-sized JPEGs made from the CIFAR-10 copy" if args.data is None else str(args.data),
        "results": rows,
    }
    rates = {r["variant"]: r["steady_images_per_s"] for r in rows}
    if "plain" in rates:
        body["speedup"] = {name: rate / rates["plain"] for name, rate in rates.items() if name != "plain"}
    table = [{k: r[k] for k in ("variant", "steady_images_per_s", "peak_memory_gib")} for r in rows]
    report("end_to_end", device, body, table, args.out)


if __name__ == "__main__":
    main()
