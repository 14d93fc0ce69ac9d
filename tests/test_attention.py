"""Attention masks and Jaccard against hand computations, and ``dino attention`` on stored images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.cli import main
from dino.eval.attention import (
    attention_over_images,
    attention_size,
    cls_attention,
    heat_colors,
    jaccard,
    labelled_picture,
    mass_masks,
    object_jaccards,
)
from dino.models.vision_transformer import vit

FIXTURES = Path(__file__).parent / "fixtures"
VOC = FIXTURES / "voc"
FRAMES = FIXTURES / "davis" / "JPEGImages" / "480p" / "blackswan"


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit("tiny", patch_size=8, img_size=32, depth=1).eval()


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory, tiny_vit) -> Path:
    path = tmp_path_factory.mktemp("model") / "backbone.pth"
    torch.save(tiny_vit.state_dict(), path)
    return path


def test_mass_masks_keep_the_smallest_top_set_by_hand() -> None:
    attn = torch.tensor([[[0.15, 0.5], [0.05, 0.3]]])  # one head, 2x2 patches
    assert mass_masks(attn, 0.6).tolist() == [[[False, True], [False, True]]]  # 0.5 + 0.3 >= 0.6
    assert mass_masks(attn, 0.5).tolist() == [[[False, True], [False, False]]]  # 0.5 alone is enough
    assert mass_masks(attn, 0.81).tolist() == [[[True, True], [False, True]]]
    assert mass_masks(attn, 1.0).all()
    # Unnormalised maps give the same masks: the mass is relative to the head's total.
    assert torch.equal(mass_masks(attn * 7, 0.6), mass_masks(attn, 0.6))
    with pytest.raises(ValueError, match="threshold"):
        mass_masks(attn, 0.0)


def test_mass_masks_match_the_ascending_cumulative_rule() -> None:
    """The reference rule: sort ascending, keep patches whose cumulative mass exceeds 1 - threshold."""
    torch.manual_seed(0)
    attn = torch.rand(4, 6, 7) ** 3
    for threshold in (0.3, 0.6, 0.9):
        flat = attn.reshape(4, -1)
        values, order = torch.sort(flat / flat.sum(1, keepdim=True), dim=1)
        keep_sorted = values.cumsum(1) > 1 - threshold
        expected = torch.zeros_like(keep_sorted)
        for h in range(4):
            expected[h, order[h]] = keep_sorted[h]
        assert torch.equal(mass_masks(attn, threshold), expected.reshape(attn.shape))


def test_jaccard_ignores_void_by_hand() -> None:
    labels = np.array([[0, 1, 1], [0, 255, 15], [0, 0, 255]], dtype=np.uint8)  # foreground: 3 pixels
    pred = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=bool)  # hits 2, misses 1, 1 false, 2 on void
    assert jaccard(pred, labels) == pytest.approx(2 / 4)
    assert jaccard(np.zeros((3, 3), bool), np.zeros((3, 3), np.uint8)) == 1.0
    assert jaccard(labels.astype(bool) & (labels != 255), labels) == 1.0
    with pytest.raises(ValueError, match="ground truth"):
        jaccard(pred[:2], labels)


def test_attention_size_keeps_aspect_on_the_patch_grid() -> None:
    assert attention_size(513, 513, 480, 16) == (480, 480)
    assert attention_size(120, 214, 64, 8) == (64, 112)
    assert attention_size(120, 214, None, 8) == (120, 216)


def test_cls_attention_on_a_non_square_image(tiny_vit) -> None:
    images = torch.randn(2, 3, 48, 80)
    attn = cls_attention(tiny_vit, images)
    assert attn.shape == (2, 3, 6, 10)
    full = tiny_vit.get_last_selfattention(images)
    # [CLS]'s attention to the patches plus to itself sums to one per head.
    torch.testing.assert_close(attn.sum(dim=(2, 3)) + full[:, :, 0, 0], torch.ones(2, 3))


def test_batches_of_mixed_sizes_keep_order_and_values(tiny_vit) -> None:
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (64, 64), (40, 56), (48, 32), (40, 56)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    device = torch.device("cpu")
    batched = list(attention_over_images(tiny_vit, images, device, image_size=None, batch_size=2))
    single = list(attention_over_images(tiny_vit, images, device, image_size=None, batch_size=1))
    assert [r.index for r in batched] == list(range(5))
    for a, b in zip(batched, single, strict=True):
        assert a.original_size == b.original_size
        torch.testing.assert_close(a.attention, b.attention, rtol=1e-4, atol=1e-6)


def test_heat_colors_run_dark_to_bright() -> None:
    colors = heat_colors(np.array([[0.0, 1.0, 2.0]]))
    assert colors[0, 0].tolist() == [0, 0, 4] and colors[0, 2].tolist() == [252, 255, 164]
    assert colors[0, 1].sum() > colors[0, 0].sum()


def test_attention_command_jaccard_on_voc_fixtures(tmp_path: Path, tiny_vit_file: Path) -> None:
    out = tmp_path / "results.json"
    rc = main(
        [
            "attention", str(VOC / "images"), "--masks", str(VOC / "SegmentationClass"), "--weights",
            str(tiny_vit_file), "--device", "cpu", "--image-size", "64", "--num-workers", "0",
            "--output-dir", str(tmp_path / "pics"), "--output", str(out), "--quiet",
            "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
        ]
    )  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["images"] == 3 and len(results["foreground_jaccard_per_head"]) == 3
    assert results["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    per_image = results["per_image"]
    # Recompute from the saved binary masks of every head, independently: the paper's per-object Jaccard
    # (per object the best head over all pixels, averaged over objects, then images) and the foreground one
    # (void ignored).
    paper, foreground = [], []
    for name in per_image:
        stem = Path(name).stem
        labels = np.array(Image.open(VOC / "SegmentationClass" / f"{stem}.png"))
        heads = []
        for h in range(3):
            mask = np.array(Image.open(tmp_path / "pics" / stem / f"mask-head{h}.png")) > 0  # 64 px grid
            heads.append(np.array(Image.fromarray(mask).resize(labels.shape[::-1], Image.NEAREST)))
        objects = [o for o in np.unique(labels) if o not in (0, 255)]
        per_object = [
            max(100 * (h & (labels == o)).sum() / (h | (labels == o)).sum() for h in heads) for o in objects
        ]
        assert per_image[name]["objects"] == len(objects)
        assert per_image[name]["jaccard"] == pytest.approx(np.mean(per_object))
        paper.append(np.mean(per_object))
        valid, fg = labels != 255, (labels != 0) & (labels != 255)
        fg_scores = [100 * (fg & h).sum() / ((fg | h) & valid).sum() for h in heads]
        assert per_image[name]["foreground_jaccard_best_head"] == pytest.approx(max(fg_scores))
        assert per_image[name]["foreground_best_head"] == int(np.argmax(fg_scores))
        foreground.append(fg_scores)
    assert results["jaccard"] == pytest.approx(np.mean(paper))
    assert results["foreground_jaccard_best_head"] == pytest.approx(np.mean(np.max(foreground, axis=1)))
    assert results["foreground_jaccard_head_mean"] == pytest.approx(np.mean(foreground))
    assert results["foreground_jaccard_per_head"] == pytest.approx(list(np.mean(foreground, axis=0)))
    pictures = {p.name for p in (tmp_path / "pics" / "0020").iterdir()}
    assert {
        "image.png",
        "attn-head0.png",
        "overlay-head2.png",
        "mask-overlay-head1.png",
        "attn-mean.png",
        "summary.png",
    } <= pictures


def test_attention_command_single_image_and_video(tmp_path: Path, tiny_vit_file: Path) -> None:
    common = ["--weights", str(tiny_vit_file), "--device", "cpu", "--image-size", "48", "--quiet"]
    assert main(["attention", str(FRAMES / "00000.jpg"), "--output-dir", str(tmp_path / "one"), *common]) == 0
    pictures = tmp_path / "one" / "00000"
    with Image.open(pictures / "mask-head0.png") as img:
        assert img.size == (88, 48)  # 214x120 → short side 48, both sides multiples of 8
    with Image.open(pictures / "overlay-head0.png") as img:
        assert img.width > 88 and img.height > 48  # a title above, a colour bar on the right
    saved = np.load(pictures / "attention.npz")
    assert saved["attention"].shape == (3, 6, 11) and saved["masks"].dtype == bool
    assert float(saved["threshold"]) == pytest.approx(0.6)
    gif = tmp_path / "attn.gif"
    assert (
        main(["attention", str(FRAMES), "--video", "--animation", str(gif), "--max-images", "3", *common])
        == 0
    )
    with Image.open(gif) as img:
        assert img.n_frames == 3 and img.size == (88, 48)


def test_attention_command_errors_before_work(tmp_path: Path, tiny_vit_file: Path, capsys) -> None:
    rc = main(["attention", str(tmp_path / "missing.jpg"), "--weights", str(tiny_vit_file)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(
        ["attention", str(FRAMES), "--weights", "torchvision:resnet18", "--random-init", "--device", "cpu"]
    )
    assert rc == 2 and "Vision Transformer" in capsys.readouterr().err
    rc = main(["attention", str(FRAMES), "--video", "--animation", str(tmp_path / "a.png"), "--weights", "x"])
    assert rc == 2 and ".gif" in capsys.readouterr().err


def test_object_jaccards_score_each_object_against_each_head() -> None:
    """Two objects side by side: a head covering both scores 1/2 on each (per object), a head on one object
    1 on it and 0 on the other; a mask over void pixels pays for them in the union (as the paper's code)."""
    labels = np.zeros((4, 6), dtype=np.uint8)
    labels[1:3, 0:2], labels[1:3, 3:5], labels[0, 5] = 7, 9, 255
    both, left = np.isin(labels, (7, 9)), labels == 7
    over_void = left | (labels == 255)
    scores = object_jaccards(np.stack([both, left, over_void]), labels)
    assert sorted(scores) == [7, 9]
    np.testing.assert_allclose(scores[7], [0.5, 1.0, 4 / 5])
    np.testing.assert_allclose(scores[9], [0.5, 0.0, 0.0])
    # The image's number: per object the best head, averaged: (1 + 1/2) / 2; the foreground Jaccard of the
    # head on both objects would be 1.
    assert np.mean([v.max() for v in scores.values()]) == 0.75
    assert jaccard(both, labels) == 1.0


def _decompression_bomb(path: Path) -> Path:
    """A PNG header announcing 30000 × 30000 pixels (far over any limit) and no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_attention_command_skips_undecodable_files(
    tmp_path: Path, tiny_vit_file: Path, caplog, capsys
) -> None:
    """A folder with a good image, a corrupt file and a decompression bomb: pictures for the good one, one
    warning for each bad one; a bad file given alone, or a folder of bad files only, is refused in one line."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "b_good.jpg").write_bytes((FRAMES / "00000.jpg").read_bytes())
    (folder / "a_corrupt.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    _decompression_bomb(folder / "c_bomb.png")
    common = ["--weights", str(tiny_vit_file), "--device", "cpu", "--image-size", "48", "--quiet"]
    out = tmp_path / "r.json"
    with caplog.at_level("WARNING"):
        rc = main(
            ["attention", str(folder), "--output-dir", str(tmp_path / "pics"), "--output", str(out), *common]
        )
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["b_good"]
    assert (tmp_path / "pics" / "b_good" / "overlay-head0.png").is_file()
    results = json.loads(out.read_text())
    assert results["images"] == 1 and results["skipped_undecodable"] == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([m for m in warned if "a_corrupt.jpg" in m]) == 1
    assert len([m for m in warned if "c_bomb.png" in m and "decompression bomb" in m]) == 1
    capsys.readouterr()
    for bad in (folder / "a_corrupt.jpg", folder / "c_bomb.png"):
        assert main(["attention", str(bad), "--output-dir", str(tmp_path / "none"), *common]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"dino: error: cannot use {bad}: ")
    (folder / "b_good.jpg").unlink()
    assert main(["attention", str(folder), "--output-dir", str(tmp_path / "none"), *common]) == 2
    assert "none of the 2 images could be decoded" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_attention_jaccard_skips_undecodable_files(tmp_path: Path, tiny_vit_file: Path) -> None:
    """With --masks, a corrupt image (whose mask exists) is skipped and the others are scored as without it."""
    import shutil

    images, masks = tmp_path / "images", tmp_path / "masks"
    shutil.copytree(VOC / "images", images)
    shutil.copytree(VOC / "SegmentationClass", masks)
    first = sorted(images.iterdir())[0]
    (images / "0000_corrupt.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    shutil.copy(masks / f"{first.stem}.png", masks / "0000_corrupt.png")
    scores = {}
    for name, folder in (("with", images), ("without", VOC / "images")):
        out = tmp_path / f"{name}.json"
        rc = main(
            ["attention", str(folder), "--masks", str(masks), "--no-pictures", "--weights", str(tiny_vit_file),
             "--device", "cpu", "--image-size", "64", "--quiet", "--output", str(out)]
        )  # fmt: skip
        assert rc == 0
        scores[name] = json.loads(out.read_text())
    assert scores["with"]["skipped_undecodable"] == 1 and scores["with"]["images"] == 3
    assert scores["with"]["per_image"] == scores["without"]["per_image"]


def test_labelled_picture_has_title_colour_bar_and_legend() -> None:
    array = np.full((96, 64, 3), 128, dtype=np.uint8)
    heat = np.array(labelled_picture(array, "head 0 attention", colour_bar=(0.001, 0.25)))
    top = heat.shape[0] - 96 - 4  # the picture sits under the title band, 4 px from the bottom
    assert top > 10 and heat.shape[1] > 64 + 12
    assert (heat[:top] < 100).any()  # the title's dark text in the white band above the picture
    assert (heat[top : top + 96, 4 : 4 + 64] == 128).all()  # the picture itself, untouched
    ramp = heat[top : top + 96, 4 + 64 + 4 + 6]  # the middle column of the colour bar
    assert ramp[0].sum() > ramp[-1].sum() + 400  # bright (max) at the top, dark (min) at the bottom
    legend = [((255, 64, 64), "top patches"), ((60, 60, 60), "the rest")]
    masked = np.array(labelled_picture(array, "head 0 mass mask", legend=legend))
    assert masked.shape[0] > heat.shape[0]  # two legend lines below the picture
    assert ((masked == (255, 64, 64)).all(axis=-1)).any()  # the swatch in the mask's colour
