"""A backbone out as a computation graph, to run without this package (``dino export --format onnx|pt2``).

- ``onnx``: an ONNX model (one file, opset 18) with the input ``images`` [batch, 3, S, S] (normalised as in
  training) and the output ``features`` [batch, D] ([CLS] for a ViT, pooled for a ResNet); the batch axis is
  dynamic, the image size fixed at export (``img_size``: the weights' own size by default, other sizes
  resample ViT position embeddings first). Exported with torch's ``torch.export``-based ONNX exporter
  (``dynamo=True``; the older tracing exporter cannot follow the ViT's position-embedding resampling);
  needs ``onnx`` and ``onnxscript`` (``pip install 'dino[onnx]'``).
- ``pt2``: the same graph saved with ``torch.export.save`` (dynamic batch), loaded back with
  ``torch.export.load(path).module()``: PyTorch without this package's code.

Every export is checked before it is reported as written: the file is run (ONNX Runtime on the CPU when it
is installed, else the ONNX checker; ``torch.export.load`` for pt2) on a batch of another size than the one
traced, and its features compared with the PyTorch module's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from dino.hub.errors import WeightsError, Which
from dino.hub.export import export_target
from dino.hub.loading import LoadedBackbone, backbone_from_weights
from dino.hub.weights import read_backbone_weights
from dino.models.backbones import convnet_image_size

GraphFormat = Literal["onnx", "pt2"]
GRAPH_FORMATS: tuple[str, ...] = ("onnx", "pt2")
ONNX_OPSET = 18
TRACE_BATCH, CHECK_BATCH = 2, 3  # the example batch traced, and the other size the check runs
# float32 kernels differ between runtimes (fused attention, other summation orders): features agree to
# this relative error (max |difference| / max |feature|), far above it when a layer is wrong.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class GraphExported:
    """What was written, how closely it reproduces PyTorch, and how to run it."""

    path: Path
    format: str
    backbone: LoadedBackbone
    img_size: int
    max_abs_diff: float
    checked_with: str
    load_hint: str


def export_graph(
    source: str | Path,
    fmt: GraphFormat = "onnx",
    output: str | Path | None = None,
    *,
    which: Which = "teacher",
    img_size: int | None = None,
    weights_dir: str | Path | None = None,
    download: bool = False,
    overwrite: bool = False,
) -> GraphExported:
    """Write the ``which`` backbone of ``source`` (anything :func:`dino.hub.load` accepts) as ``fmt`` for
    inputs of ``img_size`` pixels, atomically, after checking the written graph against PyTorch."""
    if fmt not in GRAPH_FORMATS:
        raise WeightsError(f"unknown graph format {fmt!r}; choose one of {', '.join(GRAPH_FORMATS)}")
    if fmt == "onnx":
        _require_modules(("onnx", "onnxscript"), "onnx")
    target = export_target(source, fmt, output, which, weights_dir, download, overwrite)
    weights = read_backbone_weights(source, which, weights_dir=weights_dir)
    is_vit = weights.arch.startswith("vit_")
    if img_size is not None and is_vit:
        weights = weights.resampled(img_size)
    size = img_size or (weights.img_size if is_vit else convnet_image_size(weights.arch))
    if size < 1:
        raise WeightsError(f"--img-size must be a positive number of pixels, got {size}")
    backbone = backbone_from_weights(weights)
    model = backbone.model
    example = torch.randn(TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    target.parent.mkdir(parents=True, exist_ok=True)
    # the temporary file keeps the suffix: torch.export.save and load want ".pt2"
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        with _quiet_exporters():
            if fmt == "onnx":
                _write_onnx(model, example, tmp)
            else:
                _write_pt2(model, example, tmp)
        check = torch.randn(CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(check)
        got, checked_with = _run_onnx(tmp, check) if fmt == "onnx" else _run_pt2(tmp, check)
        diff = _compare(got, expected, target)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    hint = _load_hint(target, fmt, size)
    return GraphExported(target, fmt, backbone, size, diff, checked_with, hint)


def _require_modules(modules: tuple[str, ...], extra: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise WeightsError(f"this export needs {', '.join(missing)}: pip install 'dino[{extra}]'")


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' optimisation passes log each step at INFO level: keep their warnings only."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=4096)


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["features"],
        dynamic_shapes=({0: _batch_dim()},),
        opset_version=ONNX_OPSET,
        verbose=False,
    )
    if program is None:  # pragma: no cover - the dynamo exporter returns its program
        raise WeightsError("torch.onnx.export returned no ONNX program")
    program.save(str(path), external_data=False)


def _write_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(path))


def _run_onnx(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, str]:
    if importlib.util.find_spec("onnxruntime") is None:  # the structure at least
        import onnx

        onnx.checker.check_model(str(path))
        return torch.full((images.shape[0], 1), float("nan")), "onnx.checker (onnxruntime not installed)"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (features,) = session.run(["features"], {"images": images.numpy()})
    return torch.from_numpy(features), f"ONNX Runtime {onnxruntime.__version__} on the CPU"


def _run_pt2(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, str]:
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return module(images), "torch.export.load"


def _compare(got: torch.Tensor, expected: torch.Tensor, target: Path) -> float:
    """The largest absolute difference; an error when it exceeds :data:`TOLERANCE` of the features' scale
    (NaN: not run, nothing to compare)."""
    if got.isnan().all():
        return float("nan")
    if got.shape != expected.shape:
        raise WeightsError(
            f"{target}: the exported graph gives {tuple(got.shape)}, PyTorch {tuple(expected.shape)}"
        )
    diff = float((got.float() - expected.float()).abs().max())
    scale = float(expected.abs().max()) or 1.0
    if not diff <= TOLERANCE * scale:
        raise WeightsError(
            f"{target}: the exported graph's features differ from PyTorch's by up to {diff:.3g} "
            f"(features up to {scale:.3g}); not written"
        )
    return diff


def _load_hint(path: Path, fmt: str, size: int) -> str:
    if fmt == "onnx":
        return (
            f"onnxruntime.InferenceSession({str(path)!r}).run(['features'], {{'images': x}})[0]"
            f"  # x: float32 [N, 3, {size}, {size}], normalised as in training"
        )
    return f"torch.export.load({str(path)!r}).module()(x)  # x: float32 [N, 3, {size}, {size}], normalised"
