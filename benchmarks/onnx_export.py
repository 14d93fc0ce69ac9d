"""``dino export --format onnx`` on the released architectures: export time, ONNX Runtime (CPU) against
PyTorch (CPU, fp32) on the same images: the largest feature difference and images/s of each.

The backbones are untrained (seeded): the graph and the arithmetic are those of the released weights, and
nothing is downloaded. Each architecture is saved, exported with :func:`dino.hub.graph_export.export_graph`
(which checks its own parity once), then both runtimes run ``--batch`` images for ``--seconds``.

    python benchmarks/onnx_export.py --archs vit_small/16,resnet50 --out results/onnx_export_cpu.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from _common import benchmark_parser, report

from dino.hub import build_untrained
from dino.hub.graph_export import export_graph


def _rate(run, batch: int, seconds: float) -> float:
    run()  # warm-up
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run()
        done += batch
    return done / (time.perf_counter() - start)


def measure(arch_patch: str, batch: int, seconds: float, folder: Path) -> dict:
    import onnxruntime

    arch, _, patch = arch_patch.partition("/")
    torch.manual_seed(0)
    backbone = build_untrained(arch, int(patch or 16)).model.eval()
    source = folder / f"{arch}_{patch or 0}.pth"
    torch.save(backbone.state_dict(), source)
    start = time.perf_counter()
    exported = export_graph(source, "onnx", folder / f"{arch}_{patch or 0}.onnx")
    export_s = time.perf_counter() - start
    size = exported.img_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    (onnx_features,) = session.run(["features"], {"images": images.numpy()})
    with torch.no_grad():
        torch_features = backbone(images)
    diff = float((torch.from_numpy(onnx_features) - torch_features).abs().max())

    def run_torch() -> None:
        with torch.no_grad():
            backbone(images)

    def run_onnx() -> None:
        session.run(["features"], {"images": images.numpy()})

    return {
        "arch": arch_patch,
        "img_size": size,
        "batch": batch,
        "export_s": export_s,
        "onnx_mb": exported.path.stat().st_size / 2**20,
        "max_abs_diff": diff,
        "max_abs_feature": float(torch_features.abs().max()),
        "pytorch_img_s": _rate(run_torch, batch, seconds),
        "onnxruntime_img_s": _rate(run_onnx, batch, seconds),
    }


def main() -> None:
    parser = benchmark_parser(__doc__, device=False)
    parser.add_argument("--archs", default="vit_small/16,resnet50", help="comma-separated arch[/patch]")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="timing per runtime and architecture")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.archs.split(","):
            rows.append(measure(arch, args.batch, args.seconds, Path(folder)))
    threads = torch.get_num_threads()
    report("onnx_export", torch.device("cpu"), {"torch_threads": threads, "rows": rows}, rows, args.out)


if __name__ == "__main__":
    main()
