"""What every benchmark shares: the machine description, JSON + markdown output, and test data on disk."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The project's shared data folder sits beside the checkout; elsewhere (a lent GPU machine) point
# DINO_SHARED_DATA at a copy of it.
SHARED_DATA = Path(os.environ.get("DINO_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR_TARBALL = SHARED_DATA / "cifar10-train-jpeg.tar.gz"


def student_teacher(
    arch: str,
    patch: int,
    out_dim: int,
    device: torch.device,
    drop_path: float = 0.0,
    depth: int = 0,
    size: int = 224,
    fused_attention: bool = True,
):
    """A DINO student (stochastic depth ``drop_path``) and its teacher (none), same weights, on ``device``."""
    from dino.models.backbones import build_backbone
    from dino.models.head import DINOHead
    from dino.models.multicrop import MultiCropWrapper
    from dino.teacher import init_teacher

    def model(rate: float) -> MultiCropWrapper:
        backbone, dim = build_backbone(arch, patch, size, rate, depth)
        if hasattr(backbone, "set_fused_attention"):
            backbone.set_fused_attention(fused_attention)
        return MultiCropWrapper(backbone, DINOHead(dim, out_dim)).to(device)

    student = model(drop_path)
    return student, init_teacher(model(0.0), student)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def hardware(device: torch.device) -> dict:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _document(name: str, device: torch.device, body: dict) -> dict:
    return {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "hardware": hardware(device),
        **body,
    }


def _write(text: str, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def save_partial(name: str, device: torch.device, body: dict, out: Path | None) -> None:
    """Write what is measured so far to ``out`` (marked ``"partial": true``), so that a benchmark stopped
    by a time limit keeps it; the final :func:`report` overwrites it."""
    _write(json.dumps(_document(name, device, body | {"partial": True}), indent=2), out)


def report(name: str, device: torch.device, body: dict, table: list[dict], out: Path | None) -> dict:
    """Print the JSON and a markdown table of ``table`` rows; write the JSON to ``out``."""
    result = _document(name, device, body)
    text = json.dumps(result, indent=2)
    print(text)
    if table:
        keys = list(table[0])
        print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for row in table:
            print("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    _write(text, out)
    return result


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def benchmark_parser(doc: str | None, device: bool = True) -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: its docstring as help, ``--out`` (the JSON file to
    write) and, unless ``device`` is False, ``--device``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if device:
        parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, head: bool = True) -> None:
    """``--arch``, ``--patch`` and, with ``head``, ``--out-dim`` (the DINO head's K): the paper's ViT-S/16."""
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=16)
    if head:
        parser.add_argument("--out-dim", type=int, default=65536, help="prototypes K of the DINO head")


def plain_overrides(gpu: bool) -> list[str]:
    """``dino train`` overrides of the plain setup the benchmarks compare against: the paper's PIL pipeline
    image by image in loader workers (every epoch decoding the files again), fp16 autocast on a GPU, eager."""
    return [
        "data.augment_on=workers",
        "data.in_memory=false",
        f"run.precision={'fp16' if gpu else 'fp32'}",
        "run.compile=false",
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cifar_members(limit: int | None = None) -> list[tuple[str, bytes]]:
    """(class name, JPEG bytes) of the CIFAR-10 copy in ``../shared/data``, in a fixed shuffled order."""
    if not CIFAR_TARBALL.is_file():
        sys.exit(f"{CIFAR_TARBALL} not found: this benchmark needs the project's shared data folder")
    members = []
    with tarfile.open(CIFAR_TARBALL) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                members.append((Path(member.name).parent.name, tar.extractfile(member).read()))
    random.Random(0).shuffle(members)
    return members[:limit] if limit else members


def imagenet_sized_jpegs(dest: Path, count: int, size: tuple[int, int] = (500, 375)) -> Path:
    """``count`` ImageNet-sized JPEGs (quality 90) in class folders under ``dest``, made once.

    Real content: CIFAR-10 images (the only real photos in ``../shared/data``) upscaled bicubically to
    ``size`` — ImageNet's typical 500×375. Upscaled images are smoother than camera photos, so they decode
    somewhat faster than real ImageNet files of the same size; the pixel count is what dominates.
    """
    marker = dest / f".complete-{count}-{size[0]}x{size[1]}"
    if marker.is_file():
        return dest
    jobs = [
        (dest / label / f"{i:06d}.jpg", data, size) for i, (label, data) in enumerate(cifar_members(count))
    ]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_upscale, jobs, chunksize=64))
    marker.touch()
    return dest


def _upscale(job: tuple[Path, bytes, tuple[int, int]]) -> None:
    path, data, size = job
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
