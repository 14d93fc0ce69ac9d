"""Label propagation against a dense re-implementation, and end-to-end runs on stored DAVIS frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.cli import main
from dino.eval.video_segmentation import (
    DAVIS_MEAN,
    DAVIS_STD,
    FrameDataset,
    PropagationSettings,
    check_scorable,
    default_palette,
    evaluate_davis,
    labels_to_mask,
    list_sequences,
    neighborhood_mask,
    one_hot_labels,
    patch_features,
    processing_size,
    propagate,
    read_palette,
    require_vit,
    segment_video,
    sequence_frames,
)
from dino.models.vision_transformer import vit

DAVIS = Path(__file__).parent / "fixtures" / "davis"


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory) -> Path:
    """A one-block ViT-tiny/8 saved as a backbone file."""
    torch.manual_seed(0)
    model = vit("tiny", patch_size=8, img_size=32, depth=1)
    path = tmp_path_factory.mktemp("model") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path


def test_processing_size_follows_the_reference_rounding() -> None:
    settings = PropagationSettings()
    assert processing_size(480, 854, 16, settings) == (480, 832)
    assert processing_size(854, 480, 8, settings) == (832, 480)
    # A patch size that does not divide 64 rounds to itself; the short side too.
    assert processing_size(480, 854, 14, settings) == (476, 840)
    assert processing_size(120, 214, 8, PropagationSettings(short_side=64)) == (64, 64)
    assert processing_size(120, 214, 8, PropagationSettings(short_side=64, size_multiple=8)) == (64, 112)


def test_neighborhood_mask_by_hand() -> None:
    mask = neighborhood_mask(2, 3, 1, torch.device("cpu"))
    assert mask is not None and mask.shape == (6, 6)
    # patch (0, 0) = index 0 sees (0,0), (0,1), (1,0), (1,1) but not column 2
    assert mask[:, 0].tolist() == [True, True, False, True, True, False]
    assert torch.equal(mask, mask.T)
    assert neighborhood_mask(2, 3, 0, torch.device("cpu")) is None
    assert torch.equal(neighborhood_mask(2, 3, 1, torch.device("cpu"), range(2, 5)), mask[:, 2:5])


def _dense_reference(target, feats, labels, topk, temperature, mask):
    """The reference algorithm written plainly: one dense affinity over all context patches."""
    aff = torch.cat(
        [torch.exp(f @ target.T / temperature) * (mask.float() if mask is not None else 1) for f in feats]
    )
    kth = torch.topk(aff, k=topk, dim=0).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    return torch.cat(labels, dim=1) @ aff


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_propagate_matches_a_dense_implementation(radius: int) -> None:
    torch.manual_seed(1)
    h, w, d, k_classes = 4, 5, 16, 3
    n = h * w
    target = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    feats = [torch.nn.functional.normalize(torch.randn(n, d), dim=1) for _ in range(4)]
    labels = [torch.softmax(torch.randn(k_classes, n), dim=0) for _ in range(4)]
    settings = PropagationSettings(topk=5, neighborhood=radius, temperature=0.1)
    mask = neighborhood_mask(h, w, radius, torch.device("cpu"))
    got = propagate(target, feats, labels, settings, (h, w))
    expected = _dense_reference(target, feats, labels, 5, 0.1, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Processing the target patches in chunks (here 3 columns at a time) changes nothing.
    torch.testing.assert_close(propagate(target, feats, labels, settings, (h, w), block=3 * n), got)
    torch.testing.assert_close(got.sum(dim=0), torch.ones(n))


def test_one_hot_labels_give_void_no_label() -> None:
    onehot = one_hot_labels(np.array([[0, 1], [255, 2]], dtype=np.uint8), 3)
    assert onehot.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]


def test_labels_to_mask_upsamples_and_rescales_each_channel() -> None:
    # Channel 1 is weak everywhere but, rescaled to [0, 1], it wins where it peaks (reference behaviour).
    soft = torch.tensor([[0.9, 0.8, 0.9, 0.9], [0.1, 0.2, 0.1, 0.1]])
    labels = labels_to_mask(soft, (2, 2), 1, (2, 2))
    assert labels.tolist() == [[0, 1], [0, 0]]
    big = labels_to_mask(soft, (2, 2), 4, (16, 16))
    assert big.shape == (16, 16) and big.dtype == np.uint8


def test_palette_comes_from_the_dataset_never_the_network(tmp_path: Path) -> None:
    palette = read_palette(DAVIS, DAVIS / "Annotations" / "480p" / "dog" / "00000.png")
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0] and len(palette) == 768
    # Without palette.txt: the first annotation's palette; without that either: the computed DAVIS map.
    assert read_palette(tmp_path, DAVIS / "Annotations" / "480p" / "dog" / "00000.png")[:6] == [
        0,
        0,
        0,
        128,
        0,
        0,
    ]
    assert default_palette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert default_palette()[255 * 3 : 255 * 3 + 3] == [224, 224, 192]


def test_require_vit_explains_resnets() -> None:
    import torchvision

    with pytest.raises(ValueError, match="needs a Vision Transformer"):
        require_vit(torchvision.models.resnet18(), "video segmentation")


def test_static_video_propagates_the_first_mask(tmp_path: Path) -> None:
    """Frames all equal to the first: with top-1, every patch copies its own label, so the mask stays put."""
    root = tmp_path / "davis"
    for sub in ("JPEGImages", "Annotations"):
        src = DAVIS / sub / "480p" / "blackswan" / ("00000.jpg" if sub == "JPEGImages" else "00000.png")
        out = root / sub / "480p" / "still"
        out.mkdir(parents=True)
        for i in range(4):
            shutil.copy(src, out / f"{i:05d}{src.suffix}")
    torch.manual_seed(0)
    model = vit("tiny", patch_size=8, img_size=32, depth=1).eval()
    settings = PropagationSettings(topk=1, short_side=64, size_multiple=8)
    scores = evaluate_davis(
        model, root, tmp_path / "out", ["still"], settings, torch.device("cpu"), progress=False
    )
    gt = np.array(Image.open(root / "Annotations" / "480p" / "still" / "00000.png"))
    small = np.array(Image.fromarray(gt).resize((14, 8), Image.NEAREST))  # the 8x14 patch grid
    expected = labels_to_mask(one_hot_labels(small, 2), (8, 14), 8, gt.shape)
    for i in (1, 2, 3):
        np.testing.assert_array_equal(
            np.array(Image.open(tmp_path / "out" / "still" / f"{i:05d}.png")), expected
        )
    assert scores["J-mean"] > 0.5  # the 8-pixel patch grid limits it
    assert scores["J-mean"] == pytest.approx(scores["sequences"]["still"]["J-mean"])


def _iou(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> float:
    """Intersection over union of two boolean masks within ``valid``; 1 when both are empty there."""
    union = np.count_nonzero((gt | pred) & valid)
    return 1.0 if union == 0 else np.count_nonzero(gt & pred & valid) / union


def test_evaluate_davis_on_fixture_sequences(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = vit("tiny", patch_size=8, img_size=32, depth=1).eval()
    sequences = list_sequences(DAVIS)
    assert sequences == ["blackswan", "dog", "tennis"]
    settings = PropagationSettings(short_side=64)
    scores = evaluate_davis(
        model,
        DAVIS,
        tmp_path,
        sequences,
        settings,
        torch.device("cpu"),
        max_frames=4,
        batch_size=3,
        progress=False,
    )
    assert scores["objects"] == 4
    # J recomputed from the written PNGs: per object, the mean IoU (void counted as background) over frames
    # 1 .. N-2 (frame 1 alone for a 2-frame sequence), then the mean over every object of every sequence.
    per_object = []
    for seq in sequences:
        gts = [
            np.array(Image.open(p)) for p in sorted((DAVIS / "Annotations" / "480p" / seq).glob("*.png"))[:4]
        ]
        preds = [np.array(Image.open(tmp_path / seq / f"{i:05d}.png")) for i in range(len(gts))]
        scored = range(1, len(gts) - 1) if len(gts) > 2 else [1]
        for k in range(1, int(gts[0][gts[0] != 255].max()) + 1):
            per_object.append(
                np.mean([_iou(gts[t] == k, preds[t] == k, np.ones_like(gts[t], bool)) for t in scored])
            )
    assert len(per_object) == 4
    assert scores["J-mean"] == pytest.approx(np.mean(per_object))
    assert 0.0 <= scores["F-mean"] <= 1.0
    assert scores["sequences"]["blackswan"]["frames_scored"] == 2  # frames 1, 2 of the first 4
    for seq, n in (("blackswan", 4), ("dog", 4), ("tennis", 2)):
        written = sorted((tmp_path / seq).glob("*.png"))
        assert len(written) == n
        with Image.open(written[-1]) as img:
            assert img.mode == "P" and img.size == (214, 120)
            assert img.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    # The first frame is the given annotation, unchanged.
    np.testing.assert_array_equal(
        np.array(Image.open(tmp_path / "tennis" / "00000.png")),
        np.array(Image.open(DAVIS / "Annotations" / "480p" / "tennis" / "00000.png")),
    )


def test_videoseg_command_end_to_end(tmp_path: Path, tiny_vit_file: Path, capsys) -> None:
    out_json = tmp_path / "davis.json"
    rc = main(
        [
            "videoseg", "--data", str(DAVIS), "--weights", str(tiny_vit_file), "--device", "cpu",
            "--sequences", "dog", "tennis", "--short-side", "64", "--num-workers", "0",
            "--output-dir", str(tmp_path / "masks"), "--output", str(out_json),
        ]
    )  # fmt: skip
    assert rc == 0
    results = json.loads(out_json.read_text())
    assert set(results["sequences"]) == {"dog", "tennis"}
    # The original DAVIS script's normalisation (std 0.228 in the first channel), not ImageNet's 0.229.
    assert results["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.228, 0.224, 0.225]}
    assert "J&F-mean" in capsys.readouterr().out
    # Scoring an existing folder gives the same numbers without a model.
    rc = main(
        [
            "videoseg", "--data", str(DAVIS), "--score-only", "--sequences", "dog", "tennis",
            "--output-dir", str(tmp_path / "masks"), "--output", str(tmp_path / "again.json"),
        ]
    )  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "again.json").read_text())["J&F-mean"] == pytest.approx(results["J&F-mean"])
    # --no-score only writes the masks.
    rc = main(
        [
            "videoseg", "--data", str(DAVIS), "--weights", str(tiny_vit_file), "--device", "cpu", "--no-score",
            "--sequences", "dog", "--max-frames", "2", "--short-side", "64", "--num-workers", "0", "--quiet",
            "--output-dir", str(tmp_path / "only"), "--output", str(tmp_path / "only.json"),
        ]
    )  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "only" / "dog").iterdir()) == ["00000.png", "00001.png"]
    assert "J&F-mean" not in json.loads((tmp_path / "only.json").read_text())


def test_videoseg_command_refuses_a_resnet(tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "videoseg",
            "--data",
            str(DAVIS),
            "--weights",
            "torchvision:resnet18",
            "--random-init",
            "--device",
            "cpu",
        ]
    )
    assert rc == 2
    assert "Vision Transformer" in capsys.readouterr().err


def test_segment_video_matches_a_plain_propagation_loop(tmp_path: Path) -> None:
    """Each frame's context is the first frame with its given labels plus the ``n_last_frames`` previous
    frames with their soft (not arg-maxed) labels, on the (rows, columns) patch grid, neighbourhood applied:
    a plain loop over the frames' features gives the same masks. The grid (10 × 17 patches) is wider than
    the neighbourhood (radius 2), so the restriction matters, and one previous frame leaves the older ones
    out of the context."""
    frames = sorted((DAVIS / "JPEGImages" / "480p" / "blackswan").glob("*.jpg"))
    frames += sorted((DAVIS / "JPEGImages" / "480p" / "dog").glob("*.jpg"))[:2]  # 7 frames, the same size
    annotation = np.array(Image.open(DAVIS / "Annotations" / "480p" / "blackswan" / "00000.png"))
    settings = PropagationSettings(n_last_frames=1, topk=3, neighborhood=2, short_side=80, size_multiple=8)
    torch.manual_seed(0)
    model = vit("tiny", patch_size=8, img_size=32, depth=1).eval()
    got = list(segment_video(model, frames, annotation, settings, torch.device("cpu"), batch_size=4))

    size = processing_size(*annotation.shape, 8, settings)
    grid = (size[0] // 8, size[1] // 8)
    assert grid == (10, 17)
    batch = torch.stack([FrameDataset(frames, size)[i] for i in range(len(frames))])
    features = patch_features(model, batch)
    small = np.array(Image.fromarray(annotation).resize((grid[1], grid[0]), Image.NEAREST))
    first = one_hot_labels(small, int(annotation[annotation != 255].max()) + 1)
    previous: list[tuple[torch.Tensor, torch.Tensor]] = []
    expected = []
    for t in range(1, len(frames)):
        context = [(features[0], first), *previous[-1:]]
        soft = propagate(features[t], [c[0] for c in context], [c[1] for c in context], settings, grid)
        previous.append((features[t], soft))
        expected.append(labels_to_mask(soft, grid, 8, annotation.shape))
    assert len(got) == len(expected) == len(frames) - 1 >= 5
    for mine, reference in zip(got, expected, strict=True):
        np.testing.assert_array_equal(mine, reference)
    assert any((m != got[0]).any() for m in got[1:])  # the masks move: the test sees the context


def _davis_copy(tmp_path: Path, annotations: int) -> Path:
    root = tmp_path / "davis"
    shutil.copytree(DAVIS / "JPEGImages" / "480p" / "blackswan", root / "JPEGImages" / "480p" / "blackswan")
    out = root / "Annotations" / "480p" / "blackswan"
    out.mkdir(parents=True)
    for path in sorted((DAVIS / "Annotations" / "480p" / "blackswan").glob("*.png"))[:annotations]:
        shutil.copy(path, out / path.name)
    return root


def test_binary_0_255_masks_and_unannotated_sequences_are_refused_before_any_work(tmp_path: Path) -> None:
    root = _davis_copy(tmp_path, annotations=1)
    with pytest.raises(ValueError, match="pass --no-score"):
        check_scorable(root, ["blackswan"], "480p", None)
    first = root / "Annotations" / "480p" / "blackswan" / "00000.png"
    labels = np.array(Image.open(first))
    Image.fromarray(np.where(labels > 0, 255, 0).astype(np.uint8), mode="L").save(first)
    with pytest.raises(ValueError, match="DAVIS-2016's binary format"):
        sequence_frames(root, "blackswan", "480p", None)
    check_scorable(_davis_copy(tmp_path / "full", annotations=4), ["blackswan"], "480p", None)


def test_frames_are_normalised_with_the_original_davis_constants(tmp_path: Path) -> None:
    """A uniform (255, 128, 0) frame, by hand: (value / 255 - mean) / std with the original script's std
    0.228 in the first channel (ImageNet's 0.229 would give 2.249 instead of 2.259)."""
    path = tmp_path / "00000.jpg"
    Image.new("RGB", (16, 8), (255, 128, 0)).save(path, quality=100, subsampling=0)
    pixels = FrameDataset([path], (8, 16))[0]
    with Image.open(path) as img:
        r, g, b = (int(v) for v in np.array(img)[0, 0])  # the decoded values (JPEG may move them by one)
    expected = [(r / 255 - 0.485) / 0.228, (g / 255 - 0.456) / 0.224, (b / 255 - 0.406) / 0.225]
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("stored", "given", "expected"),
    [
        # A run trained on ImageNet's statistics is evaluated as the original evaluates every model.
        (
            ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            None,
            ((0.485, 0.456, 0.406), (0.228, 0.224, 0.225)),
        ),
        # A run trained on its own statistics (CIFAR) keeps them.
        (((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)), None, ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))),
        ((None, None), None, ((0.485, 0.456, 0.406), (0.228, 0.224, 0.225))),  # released weights
        (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.2,) * 3), ((0.5,) * 3, (0.2,) * 3)),
    ],
)
def test_videoseg_normalisation_defaults_to_the_davis_protocol(monkeypatch, stored, given, expected) -> None:
    import argparse

    from dino.cli import arguments
    from dino.hub import TrainingImageSettings

    monkeypatch.setattr(
        arguments, "training_image_settings", lambda weights: TrainingImageSettings(32, *stored)
    )
    args = argparse.Namespace(weights="run", mean=given and list(given[0]), std=given and list(given[1]))
    norm = arguments.normalization_options(args, fallback=(DAVIS_MEAN, DAVIS_STD), protocol=True)
    assert norm == {"mean": list(expected[0]), "std": list(expected[1])}
