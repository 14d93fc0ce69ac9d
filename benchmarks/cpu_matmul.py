"""fp32 matrix products on the CPU: PyTorch's BLAS (MKL in the x86 wheels) against numpy's (OpenBLAS in
its wheels) and oneDNN (``torch.ops.mkldnn._linear_pointwise``), on the shapes of a DINO training step.

On the CPU a training step is mostly matrix products (``profile_gpu.py --parts step``), so the BLAS sets
its pace; this measures how far PyTorch's own is from the others on this machine. The three products of a
linear layer are timed: forward ``x @ w.T`` (NT), input gradient ``g @ w`` (NN) and weight gradient
``g.T @ x`` (TN; not for oneDNN, whose operator takes the weight as [out, in]). Rounds interleave the
libraries; medians are reported.

    python benchmarks/cpu_matmul.py --out results/cpu_matmul.json
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from _common import benchmark_parser, report

# (rows, in, out): ViT-tiny/4 qkv and MLP layers on 2 × 64 × 65 tokens, a ViT-S/16 qkv and MLP, a head layer
SHAPES = [(8320, 192, 576), (8320, 768, 192), (4096, 384, 1152), (4096, 1536, 384), (512, 2048, 2048)]


def rate(fn, flops: float, seconds: float) -> float:
    """GFLOP/s of ``fn`` over at least ``seconds`` (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return flops * calls / (time.perf_counter() - start) / 1e9


def products(m: int, k: int, n: int) -> dict[str, object]:
    """The products of one linear layer per library, as zero-argument callables."""
    g = torch.Generator().manual_seed(0)
    x, w, grad = (torch.randn(*shape, generator=g) for shape in ((m, k), (n, k), (m, n)))
    xn, wn, gn = x.numpy(), w.numpy(), grad.numpy()
    linear = torch.ops.mkldnn._linear_pointwise
    return {
        "torch forward": lambda: x @ w.T,
        "numpy forward": lambda: xn @ wn.T,
        "onednn forward": lambda: linear(x, w, None, "none", [], ""),
        "torch input grad": lambda: grad @ w,
        "numpy input grad": lambda: gn @ wn,
        "onednn input grad": lambda: linear(grad, w.t(), None, "none", [], ""),
        "torch weight grad": lambda: grad.T @ x,
        "numpy weight grad": lambda: gn.T @ xn,
    }


def main() -> None:
    parser = benchmark_parser(__doc__, device=False)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5, help="per product and round")
    args = parser.parse_args()
    rows, results = [], {}
    for m, k, n in SHAPES:
        runs = products(m, k, n)
        rounds: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in runs if r % 2 == 0 else list(runs)[::-1]:
                rounds[name].append(rate(runs[name], 2.0 * m * k * n, args.seconds))
        shape = f"{m}x{k}->{n}"
        results[shape] = {
            name: {"gflops_median": statistics.median(v), "rounds": v} for name, v in rounds.items()
        }
        rows.append({"shape": shape, **{name: statistics.median(v) for name, v in rounds.items()}})
    body = {"torch_threads": torch.get_num_threads(), "numpy_blas": _numpy_blas(), "results": results}
    report("cpu_matmul", torch.device("cpu"), body, rows, args.out)


def _numpy_blas() -> str:
    try:
        info = np.show_config(mode="dicts")
        return str(info["Build Dependencies"]["blas"].get("name"))
    except Exception:  # noqa: BLE001 - only a label
        return "unknown"


if __name__ == "__main__":
    main()
