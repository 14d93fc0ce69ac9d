"""dino export --format onnx|pt2: the graph run by ONNX Runtime (CPU) or torch.export gives PyTorch's
features, for any batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dino.cli import main
from dino.hub import WeightsError, build_untrained
from dino.hub.graph_export import export_graph


def _saved(tmp_path, arch, patch=16, depth=0, seed=0):
    torch.manual_seed(seed)
    backbone = build_untrained(arch, patch, depth).model
    path = tmp_path / f"{arch}.pth"
    torch.save(backbone.state_dict(), path)
    return path, backbone


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "patch", "depth", "size_args"),
    # the ViT's weights are for 224 px: exported for 32 px inputs (position embeddings resampled first);
    # the small-image ResNet's own size is 32 px
    [("vit_tiny", 8, 2, ["--img-size", "32"]), ("resnet10_w16_cifar", 0, 0, [])],
)
def test_onnx_runtime_gives_pytorchs_features_for_any_batch(tmp_path, capsys, arch, patch, depth, size_args):
    ort = pytest.importorskip("onnxruntime")
    source, backbone = _saved(tmp_path, arch, patch, depth)
    out, size = tmp_path / "model.onnx", 32
    assert main(["export", str(source), "--format", "onnx", "--output", str(out), *size_args]) == 0
    printed = capsys.readouterr().out
    assert f"input [batch, 3, {size}, {size}]" in printed and "ONNX Runtime" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch axis
    for batch in (1, 5):
        images = torch.randn(batch, 3, size, size)
        (got,) = session.run(["features"], {"images": images.numpy()})
        with torch.no_grad():  # the PyTorch model at 32 px (a ViT resamples its embeddings on the fly)
            expected = backbone.eval()(images).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow
def test_torch_export_program_runs_without_the_package(tmp_path):
    source, backbone = _saved(tmp_path, "vit_tiny", 8, 1, seed=1)
    exported = export_graph(source, "pt2")
    assert exported.path == tmp_path / "vit_tiny_teacher.pt2"
    module = torch.export.load(str(exported.path)).module()
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(module(images), backbone.eval()(images))


def test_bad_requests_are_refused_before_exporting(tmp_path, capsys):
    source, _ = _saved(tmp_path, "resnet10_w16_cifar")
    (tmp_path / "taken.onnx").write_bytes(b"x")
    assert main(["export", str(source), "--format", "onnx", "--output", str(tmp_path / "taken.onnx")]) == 2
    assert "pass --force" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="unknown graph format"):
        export_graph(source, "tflite")  # type: ignore[arg-type]
