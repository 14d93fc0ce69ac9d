"""WebDataset shards against the folder they were written from: writing them, and reading an epoch.

Takes --images CIFAR-10 JPEGs from the shared data folder (or ImageNet-sized ones made from them with
--imagenet-sized), as class folders in a scratch directory, writes them as shards (``dino shards``' function)
and times one pass of the training loader over each, as ``dino train`` builds it with
``data.augment_on=device``: the workers only read the image bytes (a folder: one file each; shards: the
tars), so the figures compare the two ways of reading, not the augmentation. Reported: seconds to write the
shards, and images/s and MB/s of a full epoch (workers' start-up included) for each --workers.

    python benchmarks/shards.py --images 20000 --workers 0,2 --out results/shards_cpu.json
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import benchmark_parser, cifar_members, imagenet_sized_jpegs, report

from dino.config import load_config
from dino.data.gpu_loader import DeviceMultiCropLoader
from dino.data.shards import shard_pattern, write_shards
from dino.train.data import build_train_data


def _folder(dest: Path, count: int, imagenet_sized: bool) -> Path:
    if imagenet_sized:
        return imagenet_sized_jpegs(dest / "images", count)
    root = dest / "images"
    for i, (label, data) in enumerate(cifar_members(count)):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:06d}.jpg").write_bytes(data)
    return root


def _epoch(path: str, workers: int, batch: int) -> tuple[float, int, int]:
    """Seconds, images and bytes of one epoch of the training loader's byte-reading workers."""
    cfg = load_config(
        None,
        [f"data.path={path}", "data.augment_on=device", f"data.num_workers={workers}", f"run.batch_size={batch}",
         "monitor.knn_every=0", "run.device=cpu"],
    )  # fmt: skip
    data = build_train_data(cfg, 0, 1, torch.device("cpu"))
    files = data.loader.loader if isinstance(data.loader, DeviceMultiCropLoader) else data.loader
    data.set_epoch(0, 0, batch)
    start = time.perf_counter()
    images = size = 0
    for packed, labels, _ in files:
        images += len(labels)
        size += sum(int(t.numel()) for t in packed)
    return time.perf_counter() - start, images, size


def main() -> None:
    parser = benchmark_parser(__doc__, device=False)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="0,2", help="comma-separated loader worker counts")
    parser.add_argument("--imagenet-sized", action="store_true", help="500x375 JPEGs instead of 32x32 ones")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dino-shards-bench-"))
    try:
        folder = _folder(scratch, args.images, args.imagenet_sized)
        start = time.perf_counter()
        shards = write_shards(folder, scratch / "shards", args.shard_size)
        write_seconds = time.perf_counter() - start
        pattern = shard_pattern(scratch / "shards", len(shards.urls))
        table = []
        for workers in (int(w) for w in args.workers.split(",")):
            for kind, path in (("folder", str(folder)), ("shards", pattern)):
                _epoch(path, workers, args.batch_size)  # once to warm the page cache: both read from memory
                seconds, images, size = _epoch(path, workers, args.batch_size)
                table.append({"data": kind, "workers": workers, "images": images, "seconds": seconds,
                              "images_per_s": images / seconds, "mb_per_s": size / seconds / 1e6})  # fmt: skip
        body = {
            "images": args.images,
            "imagenet_sized": args.imagenet_sized,
            "shard_size": args.shard_size,
            "shards": len(shards.urls),
            "write_seconds": write_seconds,
            "batch_size": args.batch_size,
            "results": table,
        }
        report("shards", torch.device("cpu"), body, table, args.out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
