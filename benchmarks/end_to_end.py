"""End to end: ``dino train`` from JPEG files, images/s in the steady state, ours next to a plain setup.

Each variant is a real ``dino train`` run (a subprocess) over ``--images`` JPEGs for ``--epochs`` epochs;
the rate is read from its ``log.jsonl``: iterations between the first and the last log point of each epoch
over the time between them, so start-up, worker start and the end-of-epoch checkpoint are left out.
``--profile-steps N`` also profiles N steps of each run (``run.profile_steps``; their log intervals are left
out of the rate) and reports where the time went: the device's busy fraction and its time per CUDA stream
(the step's and the data path's), with the operator tables written next to ``--out``.

- ``ours``: JPEG bytes read by workers, decoded on the device in batches (nvjpeg on a GPU) and augmented
  there (``data.augment_on=device``), bf16 on GPUs that have it, fused AdamW, no per-step host sync,
  eager (also for a preset that compiles).
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
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import benchmark_parser, imagenet_sized_jpegs, pick_device, plain_overrides, report

from dino.config import load_config
from dino.train.profiling import PROFILE_SKIP

VARIANTS = {
    "ours": lambda gpu: ["data.augment_on=device", "run.precision=auto", "run.compile=false"],
    "compiled": lambda gpu: [
        "data.augment_on=device",
        "run.precision=auto",
        "run.compile=true",
        "run.compile_mode=reduce-overhead",
    ],
    "plain": plain_overrides,
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


def steady_rate(log_file: Path, images_per_step: int, exclude: tuple[int, int] | None = None) -> dict:
    """Images/s between consecutive log points of the same epoch (start-up, worker start and the epoch-end
    checkpoint fall outside), leaving out the intervals that hold any of the iterations ``exclude`` =
    (first, last), both included (an interval between log points ``before`` and ``after`` holds the
    iterations ``before + 1 .. after``)."""
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    iters = [r for r in records if r["type"] == "iter"]
    steps = seconds = 0.0
    for before, after in itertools.pairwise(iters):
        if before["epoch"] != after["epoch"]:
            continue
        if exclude and before["iteration"] < exclude[1] and after["iteration"] >= exclude[0]:
            continue
        steps += after["iteration"] - before["iteration"]
        seconds += after["time"] - before["time"]
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
           f"run.profile_steps={args.profile_steps}", *VARIANTS[name](gpu), *args.overrides]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    # The profiled steps (iterations PROFILE_SKIP .. PROFILE_SKIP + N; the last one also pays for writing
    # the profile) run slower: log intervals holding any of them are left out.
    profiled = (PROFILE_SKIP, PROFILE_SKIP + args.profile_steps) if args.profile_steps else None
    # The batch the run really used: a run.batch_size among the overrides wins over --batch.
    batch = load_config(out / "config.yaml").run.batch_size
    row = {
        "variant": name,
        "overrides": VARIANTS[name](gpu),
        "batch": batch,
        **steady_rate(out / "log.jsonl", batch, profiled),
    }
    if not gpu:
        row["peak_memory_note"] = "the main process's peak resident memory; loader workers not included"
    if args.profile_steps:
        if not (out / "profile.json").is_file():
            raise RuntimeError(
                f"{name}: no profile written; the run had fewer than {PROFILE_SKIP + args.profile_steps} steps"
            )
        row["profile"] = json.loads((out / "profile.json").read_text())
        if args.out:
            shutil.copy(out / "profile.txt", args.out.with_name(f"{args.out.stem}.{name}.profile.txt"))
    return row


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
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many steps of each run (run.profile_steps): device busy fraction and time per "
        "stream in the JSON, the tables next to --out",
    )
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
