"""Copy detection: GeM, whitening on a known covariance, positives, block AP, and ``dino copydetect``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from dino.cli import main
from dino.eval.copy_detection import (
    CopydaysLayout,
    PCAWhitening,
    SquareImages,
    block_average_precisions,
    copy_descriptor,
    positives_for,
)
from dino.eval.features import gem_pool
from dino.models.vision_transformer import vit


def test_gem_by_hand() -> None:
    x = torch.tensor([[[1.0, 0.0], [2.0, -3.0]]])  # [1, 2 tokens, 2 dims]
    # dim 0: ((1 + 16) / 2)^(1/4); dim 1: both clamped to 1e-6
    out = gem_pool(x, p=4, dim=1)
    assert out[0, 0].item() == pytest.approx((17 / 2) ** 0.25)
    assert out[0, 1].item() == pytest.approx(1e-6, rel=1e-4)


def test_vit_descriptor_is_cls_and_gem_of_patches() -> None:
    torch.manual_seed(0)
    model = vit("tiny", patch_size=8, img_size=32, depth=1).eval()
    images = torch.randn(2, 3, 32, 32)
    desc = copy_descriptor(model, images)
    tokens = model.forward_features(images)
    assert desc.shape == (2, 2 * 192)
    torch.testing.assert_close(desc[:, :192], tokens[:, 0])
    expected = tokens[:, 1:].clamp(min=1e-6).pow(4).mean(dim=1).pow(0.25)
    torch.testing.assert_close(desc[:, 192:], expected)


def test_whitening_of_a_known_covariance_by_hand() -> None:
    # Four points (±2, 0), (0, ±1) rotated by 30°: covariance eigenvalues 2 and 0.5.
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rotation = torch.tensor([[c, -s], [s, c]])
    points = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) @ rotation.T + torch.tensor(
        [5.0, -1.0]
    )
    w = PCAWhitening.fit(points, kind="centred")
    torch.testing.assert_close(w.mean, torch.tensor([5.0, -1.0]))
    torch.testing.assert_close(w.eigenvalues, torch.tensor([2.0, 0.5]))
    out = w.apply(points)
    # (±2, 0) → ±2/√2 on the first axis; (0, ±1) → ±1/√0.5 on the second.
    torch.testing.assert_close(
        out.abs(), torch.tensor([[2**0.5, 0], [2**0.5, 0], [0, 2**0.5], [0, 2**0.5]]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(out.T @ out / 4, torch.eye(2), atol=1e-5, rtol=0)
    assert w.energy == pytest.approx(1.0)


def test_whitening_gives_identity_covariance_and_limits_dimensions() -> None:
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=gen)
    features = torch.randn(500, 6, generator=gen) @ mixing.T + 3.0
    w = PCAWhitening.fit(features, kind="centred")
    out = w.apply(features)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.T @ out / 500, torch.eye(6), atol=1e-3, rtol=0)
    # Fewer images than dimensions: at most n - 1 components, never the unseen null space.
    few = PCAWhitening.fit(features[:4], kind="centred")
    assert few.projection.shape == (3, 6)
    assert PCAWhitening.fit(features, dim=2, kind="centred").projection.shape == (2, 6)
    with pytest.raises(ValueError, match="at least 1 component"):
        PCAWhitening.fit(features, dim=0)


def test_reference_whitening_uses_the_uncentred_second_moments_and_keeps_every_dimension() -> None:
    """As the original eval_copy_detection.py: eigenvectors of Fᵀ F / n of the whitening descriptors (not
    centred), eigenvalues floored at 1e-5 of the largest, every dimension kept; the descriptors it is applied
    to are centred with the whitening set's mean."""
    points = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) + torch.tensor([3.0, 0.0])
    w = PCAWhitening.fit(points)  # the default kind
    # Fᵀ F / 4 = [[11, 0], [0, 0.5]] (the offset's 9 added to the first axis's variance 2).
    torch.testing.assert_close(w.eigenvalues, torch.tensor([11.0, 0.5]))
    torch.testing.assert_close(w.apply(points)[:, 0].abs(), torch.tensor([2.0, 2.0, 0.0, 0.0]) / 11**0.5)
    features = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    kept = PCAWhitening.fit(features)
    assert kept.projection.shape == (6, 6)  # 4 images, 6 dimensions: all kept, the null space floored
    assert kept.eigenvalues.min() == pytest.approx(1e-5 * float(kept.eigenvalues.max()), rel=1e-3)


def test_positives_by_stem_then_group_prefix() -> None:
    originals = [Path("200000.jpg"), Path("200100.jpg"), Path("200200.jpg")]
    assert positives_for(Path("200100.jpg"), originals) == [1]  # same stem
    assert positives_for(Path("200105.jpg"), originals) == [1]  # same group "2001"


def test_positives_group_prefix() -> None:
    originals = [Path("200000.jpg"), Path("210000.jpg"), Path("210100.jpg")]
    assert positives_for(Path("200003.jpg"), originals) == [0]
    assert positives_for(Path("210150.jpg"), originals) == [2]
    with pytest.raises(ValueError, match="matches no original"):
        positives_for(Path("999999.jpg"), originals)


def test_block_average_precisions_by_hand() -> None:
    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.1, 0.3, 0.9]])
    # q0: positive 1 at rank 1 → (0 + 1/2)/2 = 1/4; q1: positives {2, 0} at ranks 1 and 2.
    aps = block_average_precisions(similarity, [[1], [2, 0]], max_rank=0)
    assert aps[0] == pytest.approx(0.25)
    assert aps[1] == pytest.approx((0 + 1 / 2) / 4 + (1 / 2 + 2 / 3) / 4)
    # Only the first 2 results count: q1's positive at rank 2 is lost.
    assert block_average_precisions(similarity, [[1], [2, 0]], max_rank=2)[1] == pytest.approx(1 / 8)


def _texture(rng: np.random.Generator, size: int = 48) -> Image.Image:
    low = rng.random((size // 8, size // 8, 3))
    pixels = np.kron(low, np.ones((8, 8, 1))) * 0.7 + rng.random((size, size, 3)) * 0.3
    return Image.fromarray((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def copydays(tmp_path_factory) -> Path:
    """A Copydays-like folder: 4 originals, strong edits named by group, JPEG, crops and exact copies."""
    root = tmp_path_factory.mktemp("copydays")
    rng = np.random.default_rng(0)
    folders = ["original", "strong", "jpegqual/50", "jpegqual/100", "crops/50", "whiten", "distractors"]
    for sub in folders:
        (root / sub).mkdir(parents=True)
    for i in range(4):
        name = f"20{i}000.jpg"
        image = _texture(rng)
        image.save(root / "original" / name, quality=95)
        image = Image.open(root / "original" / name)
        strong = ImageOps.mirror(image.filter(ImageFilter.GaussianBlur(2))).rotate(10)
        strong.save(root / "strong" / f"20{i}001.jpg")
        image.save(root / "jpegqual" / "50" / name, quality=50)
        shutil.copy(root / "original" / name, root / "jpegqual" / "100" / name)
        image.crop((12, 12, 36, 36)).save(root / "crops" / "50" / name)
    for i in range(6):
        _texture(rng).save(root / "whiten" / f"w{i}.jpg")
    for i in range(3):
        _texture(rng).save(root / "distractors" / f"d{i}.jpg")
    return root


def test_layout_lists_blocks_in_numeric_order(copydays: Path) -> None:
    layout = CopydaysLayout.read(copydays)
    assert list(layout.blocks) == ["original", "strong", "jpegqual/50", "jpegqual/100", "crops/50"]
    assert len(layout.originals) == 4


def test_copydetect_command_end_to_end(tmp_path: Path, copydays: Path, capsys) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(vit("tiny", patch_size=8, img_size=32, depth=1).state_dict(), weights)
    out = tmp_path / "copy.json"
    rc = main(
        ["copydetect", "--data", str(copydays), "--whiten-dir",
         str(copydays / "whiten"), "--distractors", str(copydays / "distractors"), "--imsize", "32", "--weights",
         str(weights), "--device", "cpu", "--num-workers", "0", "--quiet", "--output", str(out),
         "--whitening", "centred"]
    )  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["database"] == {"originals": 4, "distractors": 3}
    assert results["whitening"]["kind"] == "centred"
    assert results["whitening"]["dim"] == 5  # 6 whitening images: at most 5 components
    assert results["mAP"]["original"] == pytest.approx(100.0)
    assert results["mAP"]["jpegqual/100"] == pytest.approx(100.0)  # byte-identical copies
    assert set(results["per_query"]["strong"]) == {f"20{i}001.jpg" for i in range(4)}
    assert "mAP.strong" in capsys.readouterr().out


def test_strong_block_with_a_known_answer(tmp_path: Path) -> None:
    """Strong queries that are exact copies, so each one's ranking, hence the block's mAP, is known.

    Two very different originals A (group 3000) and B (group 3100). ``300001`` is a copy of A and ``310001``
    a copy of B: their positive (found by the group prefix) comes first, AP 1. ``310002`` is a copy of A but
    named in B's group: A comes first, its positive B second, AP = (0 + 1/2) / 2 = 1/4 (trapezoid rule).
    """
    root = tmp_path / "copydays"
    for sub in ("original", "strong"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    _texture(rng).save(root / "original" / "300000.jpg", quality=95)
    ImageOps.invert(_texture(rng)).rotate(90).save(root / "original" / "310000.jpg", quality=95)
    for source, copy in (("300000", "300001"), ("310000", "310001"), ("300000", "310002")):
        shutil.copy(root / "original" / f"{source}.jpg", root / "strong" / f"{copy}.jpg")
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(vit("tiny", patch_size=8, img_size=32, depth=1).state_dict(), weights)
    out = tmp_path / "copy.json"
    rc = main(
        ["copydetect", "--data", str(root), "--imsize", "32", "--weights", str(weights), "--device", "cpu",
         "--num-workers", "0", "--quiet", "--output", str(out)]
    )  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["per_query"]["strong"] == pytest.approx(
        {"300001.jpg": 100.0, "310001.jpg": 100.0, "310002.jpg": 25.0}
    )
    assert results["mAP_strong"] == pytest.approx(100 * (1 + 1 + 0.25) / 3)
    # Distractors are searched: a copy of A among them (after the originals, so the tie keeps A first)
    # pushes 310002's positive B to rank 3: AP = (0 + 1/3) / 2.
    (tmp_path / "distractors").mkdir()
    shutil.copy(root / "original" / "300000.jpg", tmp_path / "distractors" / "d.jpg")
    rc = main(
        ["copydetect", "--data", str(root), "--imsize", "32", "--weights", str(weights), "--device", "cpu",
         "--num-workers", "0", "--quiet", "--output", str(out), "--distractors", str(tmp_path / "distractors")]
    )  # fmt: skip
    assert rc == 0
    assert json.loads(out.read_text())["per_query"]["strong"] == pytest.approx(
        {"300001.jpg": 100.0, "310001.jpg": 100.0, "310002.jpg": 100 / 6}
    )


def test_copydetect_without_whitening_and_with_a_resnet(copydays: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.json"
    rc = main(
        ["copydetect", "--data", str(copydays), "--weights", "torchvision:resnet18", "--random-init",
         "--imsize", "32", "--device", "cpu", "--num-workers", "0", "--quiet", "--output", str(out)]
    )  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["descriptor_dim"] == 512 and "whitening" not in results
    assert results["mAP"]["jpegqual/100"] == pytest.approx(100.0)


def test_copydetect_errors_before_loading_a_model(tmp_path: Path, copydays: Path, capsys) -> None:
    assert main(["copydetect", "--data", str(tmp_path), "--weights", "x.pth"]) == 2
    assert "original/" in capsys.readouterr().err
    rc = main(
        ["copydetect", "--data", str(copydays), "--whiten-dir", str(tmp_path / "nope"), "--weights", "x.pth"]
    )
    assert rc == 2 and "--whiten-dir" in capsys.readouterr().err
    rc = main(["copydetect", "--data", str(copydays), "--whiten-dim", "-3", "--weights", "x.pth"])
    assert rc == 2 and "--whiten-dim -3" in capsys.readouterr().err


def test_images_are_read_without_exif_rotation_by_default_as_the_original_script(tmp_path: Path) -> None:
    """A 20 × 10 JPEG, red left and blue right, tagged to be shown rotated 90° clockwise: resized to 8 × 8
    as stored it is still red on the left; with the rotation applied, red is on top."""
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10, 0], pixels[:, 10:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "tagged.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=100, subsampling=0)
    plain = SquareImages([path], 8, mean=(0, 0, 0), std=(1, 1, 1))[0]
    assert plain[0, 4, 0] > 0.9 and plain[2, 4, 7] > 0.9 and plain[0, 0, 7] < 0.1
    turned = SquareImages([path], 8, mean=(0, 0, 0), std=(1, 1, 1), exif_transpose=True)[0]
    assert turned[0, 0, 4] > 0.9 and turned[2, 7, 4] > 0.9 and turned[0, 7, 0] < 0.1
    from dino.cli import parse_args

    assert parse_args(["copydetect", "--data", "d", "--weights", "w.pth"]).exif_rotate is False
