"""J and F against hand-computed examples, and the DAVIS scorer on stored annotations."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino.eval.davis_metrics import (
    BOUNDARY_THRESHOLD,
    boundary_map,
    boundary_tolerance,
    contour_accuracy,
    dilate,
    disk,
    evaluate_results,
    region_similarity,
    score_sequence,
    scored_frame_indices,
    statistics,
)

DAVIS = Path(__file__).parent / "fixtures" / "davis"


def _mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[rows, cols] = True
    return m


def test_region_similarity_is_iou_without_void_pixels() -> None:
    gt = _mask((4, 4), slice(0, 2), slice(0, 2))  # 4 pixels
    pred = _mask((4, 4), slice(0, 2), slice(1, 3))  # 4 pixels, 2 shared
    assert region_similarity(gt, pred) == pytest.approx(2 / 6)
    void = np.zeros((4, 4), dtype=bool)
    void[0, 2] = True  # one of pred's extra pixels is void: union 5
    assert region_similarity(gt, pred, void) == pytest.approx(2 / 5)
    empty = np.zeros((4, 4), dtype=bool)
    assert region_similarity(empty, empty) == 1.0
    assert region_similarity(gt, empty) == 0.0
    # An object lying entirely in void counts as empty on both sides.
    assert region_similarity(gt, gt, void=gt) == 1.0


def test_boundary_map_of_a_square_by_hand() -> None:
    seg = _mask((5, 5), slice(1, 3), slice(1, 3))
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(boundary_map(seg), expected)


def test_boundary_map_at_the_image_border() -> None:
    # A full mask has no boundary: the last row/column compare only along the image, not with the outside.
    assert not boundary_map(np.ones((3, 3), dtype=bool)).any()
    # A block in the bottom-right corner: last row compares east only, last column south only.
    seg = _mask((4, 4), slice(2, 4), slice(2, 4))
    expected = np.array(
        [
            [0, 0, 0, 0],
            [0, 1, 1, 1],
            [0, 1, 0, 0],
            [0, 1, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(boundary_map(seg), expected)


def test_boundary_tolerance_is_the_davis_bound() -> None:
    assert boundary_tolerance(480, 854) == 8  # ceil(0.008 * 979.6)
    assert boundary_tolerance(8, 8) == 1
    assert boundary_tolerance(100, 100, bound_th=3) == 3


def test_disk_dilation_matches_an_independent_implementation() -> None:
    assert disk(1).sum() == 5 and disk(2).sum() == 13
    rng = np.random.default_rng(0)
    mask = rng.random((30, 41)) > 0.97
    expected = np.zeros_like(mask)
    r = 3
    for y, x in zip(*np.nonzero(mask), strict=True):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dy * dy + dx * dx <= r * r and 0 <= y + dy < 30 and 0 <= x + dx < 41:
                    expected[y + dy, x + dx] = True
    np.testing.assert_array_equal(dilate(mask, r), expected)


def test_contour_accuracy_by_hand() -> None:
    gt = _mask((8, 8), slice(0, 3), slice(0, 8))  # boundary: row 2, 8 pixels
    pred = _mask((8, 8), slice(0, 3), slice(0, 4))  # boundary: row 2 cols 0-3, plus (0,3), (1,3)
    # Tolerance 1 pixel (default bound on an 8x8 image): pred matches 5 of 6, gt 5 of 8 ((2,4) is 1 away).
    score = contour_accuracy(gt, pred)
    assert score.precision == pytest.approx(5 / 6)
    assert score.recall == pytest.approx(5 / 8)
    assert score.f == pytest.approx(5 / 7)
    # Exact matching (tolerance 0): 4 of 6 and 4 of 8.
    exact = contour_accuracy(gt, pred, bound_th=0)
    assert (exact.precision, exact.recall, exact.f) == pytest.approx((4 / 6, 4 / 8, 4 / 7))
    # Two parallel edges 2 rows apart: no match at radius 1, all at radius 2.
    far = _mask((8, 8), slice(0, 5), slice(0, 8))
    assert contour_accuracy(gt, far, bound_th=1).f == 0.0
    assert contour_accuracy(gt, far, bound_th=2).f == 1.0


def test_contour_accuracy_empty_cases_and_void() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    gt = _mask((8, 8), slice(2, 5), slice(2, 5))
    assert contour_accuracy(empty, empty).f == 1.0
    missed = contour_accuracy(gt, empty)
    assert (missed.precision, missed.recall, missed.f) == (1.0, 0.0, 0.0)
    spurious = contour_accuracy(empty, gt)
    assert (spurious.precision, spurious.recall, spurious.f) == (0.0, 1.0, 0.0)
    # A spurious blob entirely inside void is not counted.
    void = _mask((8, 8), slice(0, 8), slice(5, 8))
    blob = gt | _mask((8, 8), slice(0, 2), slice(6, 8))
    assert contour_accuracy(gt, blob, void=void, bound_th=0).f == pytest.approx(
        contour_accuracy(gt, gt, void=void, bound_th=0).f
    )
    assert contour_accuracy(gt, blob, bound_th=0).f < 1.0


def test_statistics_by_hand() -> None:
    stats = statistics([1.0, 0.8, 0.6, 0.4, 0.2])
    assert stats.mean == pytest.approx(0.6)
    assert stats.recall == pytest.approx(0.6)  # 1.0, 0.8, 0.6 are above 0.5
    assert stats.decay == pytest.approx(0.9 - 0.3)  # bins [0:2] and [3:5]
    assert scored_frame_indices(5) == [1, 2, 3]
    assert scored_frame_indices(2) == [1]
    with pytest.raises(ValueError, match="at least 2 frames"):
        scored_frame_indices(1)


def test_score_sequence_multi_object_with_void() -> None:
    first = np.zeros((8, 8), dtype=np.uint8)
    first[1:3, 1:3] = 1
    first[5:7, 5:7] = 2
    gt1 = first.copy()
    gt1[7, 0] = 255
    pred1 = first.copy()
    pred1[7, 0] = 1  # on a void pixel, 5 rows from object 1's boundary
    pred1[5:7, 5:7] = 0  # object 2 lost
    last = first.copy()
    # Void left out: the pixel on it is ignored.
    objects = score_sequence([first, gt1, last], [first, pred1, np.zeros_like(last)], exclude_void=True)
    assert [o.object_id for o in objects] == [1, 2]
    assert objects[0].frames == ("00001",)  # the first and last frames are not scored
    assert objects[0].j == (1.0,) and objects[0].f == (1.0,)
    assert objects[1].j == (0.0,) and objects[1].f == (0.0,)
    # The DAVIS scorer's rule (the default): void is background, the pixel on it a false positive.
    objects = score_sequence([first, gt1, last], [first, pred1, np.zeros_like(last)])
    assert objects[0].j == (4 / 5,)
    boundary = contour_accuracy(gt1 == 1, pred1 == 1, None, BOUNDARY_THRESHOLD)
    assert objects[0].f == (boundary.f,) and boundary.f < 1.0
    assert objects[1].j == (0.0,)


def test_evaluate_results_on_stored_davis_frames(tmp_path: Path) -> None:
    sequences = ["blackswan", "tennis"]
    results = tmp_path / "results"
    for seq in sequences:
        shutil.copytree(DAVIS / "Annotations" / "480p" / seq, results / seq)
    perfect = evaluate_results(DAVIS, results, sequences)
    assert perfect["J&F-mean"] == pytest.approx(1.0)
    assert perfect["objects"] == 3  # blackswan 1, tennis 2
    assert perfect["sequences"]["tennis"]["frames_scored"] == 1
    assert perfect["sequences"]["blackswan"]["frames_scored"] == 3
    # Blank out blackswan's frame 2: J and F are 0 on one of its 3 scored frames.
    path = results / "blackswan" / "00002.png"
    with Image.open(path) as img:
        blank = Image.fromarray(np.zeros_like(np.array(img)), mode="P")
        blank.putpalette(img.getpalette())
    blank.save(path)
    scores = evaluate_results(DAVIS, results, sequences)
    assert scores["sequences"]["blackswan"]["J-mean"] == pytest.approx(2 / 3)
    assert scores["sequences"]["blackswan"]["F-mean"] == pytest.approx(2 / 3)
    assert scores["J-mean"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    # A prediction over tennis's void pixels (frame 1): false positives for the DAVIS scorer, ignored when
    # void is excluded.
    path = results / "tennis" / "00001.png"
    with Image.open(path) as img:
        labels, palette = np.array(img), img.getpalette()
    assert (labels == 255).sum() > 0
    labels[labels == 255] = 1
    covered = Image.fromarray(labels, mode="P")
    covered.putpalette(palette)
    covered.save(path)
    davis_rule = evaluate_results(DAVIS, results, sequences)["sequences"]["tennis"]["objects"]["1"]
    excluded = evaluate_results(DAVIS, results, sequences, exclude_void=True)["sequences"]["tennis"][
        "objects"
    ]["1"]
    assert excluded == {"J-mean": 1.0, "F-mean": 1.0}
    assert davis_rule["J-mean"] < 0.999 and davis_rule["F-mean"] < 0.999
    (results / "tennis" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        evaluate_results(DAVIS, results, sequences)
