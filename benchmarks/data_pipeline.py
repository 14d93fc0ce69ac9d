"""Data pipeline throughput: the CPU PIL multi-crop pipeline against the batched tensor pipeline.

(a) ``cpu-pil``: ImageFolderDataset + MultiCropAugmentation in DataLoader workers (decode and augment per
    image with PIL), for each requested worker count.
(b) ``tensor``: EncodedImageDataset workers only read bytes; decode_batch decodes the batch on the device
    (nvjpeg on CUDA) and BatchMultiCrop augments the whole batch there; on a GPU ``tensor`` prepares a batch
    ahead in a background thread and ``tensor-no-prefetch`` is the same without it.
    ``tensor-augment-only`` times the augmentation alone on batches already decoded on the device.
(c) ``bytes-only``: the byte-reading workers alone, each batch handed over as one packed tensor (what
    ``tensor`` uses), and ``bytes-only-unpacked``: the same with one tensor per file (the plain way), with
    the CPU time the main process spends receiving a batch (``main_cpu_ms_per_batch``): on a GPU that is
    the prefetch thread's, beside the training loop in the same interpreter.

Images/s are measured in steady state over --seconds: the first batches (worker start-up, and the batches
the workers prepared meanwhile) are not timed, and passes over the images repeat until the time is up.
Writes JSON (hardware, command, data used) and prints a table.

    python benchmarks/data_pipeline.py                                   # bundled 32x32 CIFAR sample, CPU
    python benchmarks/data_pipeline.py --make-jpegs 2000x1500 --full-decode  # large photos: reduced decode
    python benchmarks/data_pipeline.py --data /path/to/imagenet/train --device cuda --images 4096 \\
        --workers 0,4,8 --tensor-workers 4 --out results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from _common import benchmark_parser, imagenet_sized_jpegs, pick_device, report, sync
from PIL import Image
from torch.utils.data import DataLoader, Subset

from dino.data import ImageFolderDataset, MultiCropAugmentation, collate_skipping_bad, sample_dataset
from dino.data.gpu_augment import BatchMultiCrop
from dino.data.gpu_loader import DeviceMultiCropLoader, EncodedImageDataset, collate_encoded, decode_batch
from dino.data.multicrop_spec import MultiCropSpec

PREFETCH_FACTOR = 4  # batches each loader worker prepares ahead


def _forever(batches):
    """The batches again and again (a loader: one pass after another, its workers kept alive)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


def _steady_rate(
    batches, device: torch.device, seconds: float, backlog: int, per_batch=None, cpu_time: bool = False
) -> dict:
    """Images/s of ``batches`` of (views, labels, skipped) in steady state, over ``seconds``.

    The first ``backlog + 1`` batches are not timed: worker start-up, and the batches the workers prepared
    meanwhile, which would otherwise arrive at no cost and inflate the rate of many-worker loaders. Passes
    repeat until ``seconds`` have been timed, so the rate never rests on the last few batches of one pass."""
    iterator = _forever(batches)
    for _ in range(backlog + 1):
        next(iterator)
    sync(device)
    cpu, start, images, steps = time.process_time(), time.perf_counter(), 0, 0
    for views, labels, _ in iterator:
        if per_batch is not None:
            per_batch(views)
        images += int(labels.numel())
        steps += 1
        if time.perf_counter() - start > seconds:
            break
    sync(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {"images": images, "batches": steps, "untimed_batches": backlog + 1, "seconds": elapsed,
              "images_per_s": images / elapsed}  # fmt: skip
    if cpu_time:
        result["main_cpu_ms_per_batch"] = 1e3 * cpu / steps
    return result


def _backlog(workers: int) -> int:
    """Batches a loader can hold ready when its consumer first asks: each worker's prefetch."""
    return workers * PREFETCH_FACTOR


def _crop_spec(args: argparse.Namespace) -> MultiCropSpec:
    return MultiCropSpec(
        local_crops_number=args.local_crops,
        global_crop_size=args.global_size,
        local_crop_size=args.local_size,
    )


def _loader(dataset, args: argparse.Namespace, workers: int, collate) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=args.batch,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
        persistent_workers=workers > 0,  # passes repeat within a measurement
    )


def measure_cpu_pil(
    root: Path, indices: list[int], args: argparse.Namespace, workers: int, reduced: bool = True
) -> dict:
    """The CPU pipeline as training builds it: JPEGs decoded at reduced size where every crop allows
    (``data.reduced_decode``, the default), or always at full size (``reduced=False``)."""
    augment = MultiCropAugmentation(_crop_spec(args))
    reduction = augment.decode_reduction if reduced else None
    dataset = Subset(ImageFolderDataset(root, transform=augment, decode_reduction=reduction), indices)
    loader = _loader(dataset, args, workers, collate_skipping_bad)
    return _steady_rate(loader, torch.device("cpu"), args.seconds, _backlog(workers))


def measure_tensor(
    root: Path,
    indices: list[int],
    args: argparse.Namespace,
    device: torch.device,
    prefetch: bool | None = None,
) -> dict:
    dataset = Subset(EncodedImageDataset(root), indices)
    loader = _loader(dataset, args, args.tensor_workers, collate_encoded)  # no pinning, as in training
    augment = BatchMultiCrop(_crop_spec(args))
    pipeline = DeviceMultiCropLoader(loader, augment, device, seed=0, prefetch=prefetch)
    # The prefetch thread holds one more batch ready.
    backlog = _backlog(args.tensor_workers) + int(pipeline.prefetch)
    return _steady_rate(pipeline, device, args.seconds, backlog) | {
        "workers": args.tensor_workers,
        "prefetch": pipeline.prefetch,
    }


def _unpacked(batch):
    """:func:`collate_encoded` with the file bytes as a list of tensors, one per file, each with its own
    storage (views of the packed tensor would cross as one)."""
    packed, labels, unreadable = collate_encoded(batch)
    return [data.clone() for data in packed], labels, unreadable


def measure_bytes_only(root: Path, indices: list[int], args: argparse.Namespace, packed: bool) -> dict:
    """The byte-reading workers alone: images/s and the main process's CPU time per batch received."""
    dataset = Subset(EncodedImageDataset(root), indices)
    loader = _loader(dataset, args, args.tensor_workers, collate_encoded if packed else _unpacked)

    def read(encoded) -> None:
        _ = [encoded[i] for i in range(len(encoded))]  # as decode_batch reads them

    rate = _steady_rate(
        loader, torch.device("cpu"), args.seconds, _backlog(args.tensor_workers), read, cpu_time=True
    )
    return rate | {"workers": args.tensor_workers}


def measure_augment_only(
    root: Path, indices: list[int], args: argparse.Namespace, device: torch.device
) -> dict:
    dataset = EncodedImageDataset(root)
    encoded = [dataset[i][0] for i in indices[: args.batch]]
    images = decode_batch([e for e in encoded if e is not None], device).images
    augment = BatchMultiCrop(_crop_spec(args)).to(device)
    generator = torch.Generator().manual_seed(0)  # on the CPU, as the data path draws

    def batches():
        while True:
            views = augment(images, generator)
            yield views, torch.empty(len(images)), 0

    return _steady_rate(batches(), device, args.seconds, backlog=0)


def _describe_data(args: argparse.Namespace, root: Path, count: int) -> dict:
    paths = [p for p, _ in ImageFolderDataset(root).samples[:8]]
    sizes = []
    for path in paths:
        with Image.open(path) as img:
            sizes.append(list(img.size))
    what = (
        f"folder {root}"
        if args.data
        else f"JPEGs made from the CIFAR-10 copy, upscaled to {args.make_jpegs} (smoother than photos)"
        if args.make_jpegs
        else "bundled CIFAR-10 sample (dino.data.sample_dataset('train'): 32x32 JPEGs, upscaled by the crops)"
    )
    return {"description": what, "root": str(root), "images_used": count, "example_sizes_wh": sizes}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--data", type=Path, help="image folder (default: the bundled 32x32 CIFAR-10 sample)")
    parser.add_argument("--images", type=int, default=192, help="images used, spread evenly over the folder")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument(
        "--workers", default="0,1,2", help="comma-separated worker counts for the CPU pipeline"
    )
    parser.add_argument(
        "--tensor-workers", type=int, default=1, help="byte-reading workers of the tensor path"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time limit of each measurement")
    parser.add_argument(
        "--full-decode",
        action="store_true",
        help="also the CPU pipeline decoding every JPEG at full size (data.reduced_decode=false)",
    )
    parser.add_argument(
        "--make-jpegs",
        metavar="WxH",
        help="without --data: make --images JPEGs of this size from the CIFAR-10 copy (e.g. 2000x1500) and use them",
    )
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dino-data-pipeline"))
    args = parser.parse_args()
    if args.images < 2 * args.batch:
        parser.error(
            f"--images ({args.images}) must be at least two batches (2 x --batch = {2 * args.batch})"
        )
    device = pick_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    root = args.data if args.data is not None else sample_dataset("train")
    if args.make_jpegs and args.data is None:
        width, height = (int(v) for v in args.make_jpegs.lower().split("x"))
        root = imagenet_sized_jpegs(args.scratch / f"jpegs-{width}x{height}", args.images, (width, height))
    total = len(ImageFolderDataset(root).samples)
    # Spread the images over the folder (all classes), in a fixed order.
    step = max(1, total // args.images)
    indices = list(range(0, total, step))[: args.images]

    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped-file warnings are counted by the pipelines
        for workers in (int(w) for w in args.workers.split(",") if w.strip()):
            results.append(
                {"pipeline": "cpu-pil", "device": "cpu", "workers": workers}
                | measure_cpu_pil(root, indices, args, workers)
            )
            if args.full_decode:
                results.append(
                    {"pipeline": "cpu-pil-full-decode", "device": "cpu", "workers": workers}
                    | measure_cpu_pil(root, indices, args, workers, reduced=False)
                )
        results.append(
            {"pipeline": "tensor", "device": str(device)} | measure_tensor(root, indices, args, device)
        )
        if device.type == "cuda":  # the same without the background thread that prepares a batch ahead
            results.append(
                {"pipeline": "tensor-no-prefetch", "device": str(device)}
                | measure_tensor(root, indices, args, device, prefetch=False)
            )
        results.append(
            {"pipeline": "tensor-augment-only", "device": str(device), "workers": None}
            | measure_augment_only(root, indices, args, device)
        )
        if args.tensor_workers > 0:  # handing batches over from worker processes
            for packed in (True, False):
                results.append(
                    {"pipeline": "bytes-only" if packed else "bytes-only-unpacked", "device": "cpu"}
                    | measure_bytes_only(root, indices, args, packed)
                )

    data = _describe_data(args, root, len(indices))
    crops = f"2x{args.global_size}^2 + {args.local_crops}x{args.local_size}^2"
    print(f"Data: {data['description']}; crops {crops}, batch {args.batch}")
    config = {"batch": args.batch, "crops": crops, "seconds_per_measurement": args.seconds}
    table = [
        {"pipeline": r["pipeline"], "device": r["device"], "workers": "-" if r["workers"] is None else r["workers"],
         "images/s": r["images_per_s"], "main CPU ms/batch": r.get("main_cpu_ms_per_batch", "-")}
        for r in results
    ]  # fmt: skip
    report("data_pipeline", device, {"data": data, "config": config, "results": results}, table, args.out)


if __name__ == "__main__":
    main()
