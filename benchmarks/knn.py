"""k-NN throughput: feature extraction (images/s) and weighted k-NN classification (queries/s).

(a) ``extract``: a ViT backbone's [CLS] features of 224² images (synthetic tensors already in memory, so
    this is the model's rate, not the decoder's), in the chosen precision, next to fp32.
(b) ``classify``: queries against a bank of ``--bank`` × ``--dim`` features (random unit vectors; the cost
    does not depend on their values), k = 20, T = 0.07, with the chunked top-k scan of
    :mod:`dino.eval.knn` — the 1M × 384 bank of ImageNet with ViT-S features by default.

    python benchmarks/knn.py --bank 1000000 --queries 2000 --device cpu --out results/knn_cpu.json
    python benchmarks/knn.py --device cuda --queries 50000 --out results/knn_gpu.json
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_model_arguments, benchmark_parser, pick_device, report, sync

from dino.eval.knn import knn_predict
from dino.models.backbones import build_backbone


@torch.no_grad()
def measure_extract(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None) -> dict:
    model, _ = build_backbone(args.arch, args.patch, 224, 0.0, 0)
    model = model.to(device).eval()
    images = torch.randn(args.extract_batch, 3, 224, 224, device=device)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def run() -> None:
        with autocast:
            model(images)

    run()
    sync(device)
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        run()
        done += images.shape[0]
        sync(device)
    elapsed = time.perf_counter() - start
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


def measure_classify(args: argparse.Namespace, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(args.bank, args.dim, generator=generator), dim=1)
    labels = torch.randint(0, 1000, (args.bank,), generator=generator)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=generator), dim=1)
    bank = bank.to(device)  # the bank lives where the scan runs, as in `dino knn`
    knn_predict(bank, labels, queries[:16], k=20, temperature=0.07, num_classes=1000)
    sync(device)
    start = time.perf_counter()
    knn_predict(bank, labels, queries, k=20, temperature=0.07, num_classes=1000)
    sync(device)
    elapsed = time.perf_counter() - start
    return {"queries": args.queries, "seconds": elapsed, "queries_per_s": args.queries / elapsed}


def main() -> None:
    parser = benchmark_parser(__doc__)
    add_model_arguments(parser, head=False)
    parser.add_argument("--extract-batch", type=int, default=0, help="0: 256 on a GPU, 16 on the CPU")
    parser.add_argument("--bank", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=0, help="0: 20,000 on a GPU, 1,000 on the CPU")
    parser.add_argument("--seconds", type=float, default=5.0, help="time of each extraction measurement")
    args = parser.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    args.extract_batch = args.extract_batch or (256 if gpu else 16)
    args.queries = args.queries or (20_000 if gpu else 1_000)

    name = f"extract {args.arch}/{args.patch}"
    rows = [{"what": f"{name} fp32", **measure_extract(args, device, None)}]
    if gpu:  # CPUs without bf16 instructions run autocast far slower than fp32: not measured there
        low = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        rows.append({"what": f"{name} {str(low).split('.')[-1]}", **measure_extract(args, device, low)})
    rows.append({"what": f"classify k=20 bank {args.bank}x{args.dim}", **measure_classify(args, device)})
    table = [
        {"what": r["what"], "rate": r.get("images_per_s") or r.get("queries_per_s"),
         "unit": "images/s" if "images_per_s" in r else "queries/s"}
        for r in rows
    ]  # fmt: skip
    report("knn", device, {"config": vars(args) | {"out": str(args.out)}, "results": rows}, table, args.out)


if __name__ == "__main__":
    main()
