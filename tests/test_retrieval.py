"""Revisited Oxford/Paris scoring against hand computations, safe ground-truth loading, and ``dino retrieval``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.cli import main
from dino.eval.retrieval import (
    GroundTruth,
    QueryTruth,
    RetrievalImages,
    RevisitedDataset,
    average_precision,
    batches_by_size,
    crop_box,
    load_ground_truth,
    positive_ranks,
    resize_long_side,
    score_rankings,
)
from dino.models.vision_transformer import vit

FIXTURE = Path(__file__).parent / "fixtures" / "retrieval"


def test_average_precision_trapezoid_by_hand() -> None:
    # Positives at ranks 0 and 2 of 2: (1 + 1)/4 + (1/2 + 2/3)/4 = 19/24.
    assert average_precision([0, 2], 2) == pytest.approx(19 / 24)
    assert average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    # One of two positives never retrieved: half the recall axis is missing.
    assert average_precision([0], 2) == pytest.approx(0.5)
    assert average_precision([], 3) == 0.0


def test_junk_images_are_removed_before_ranking() -> None:
    ranking = np.array([5, 3, 9, 1, 7, 2])
    # Positive 1 sits at position 3 behind one junk image, positive 2 at position 5 behind two.
    ranks = positive_ranks(ranking, positives=np.array([1, 2]), junk=np.array([3, 7]))
    assert ranks.tolist() == [2, 3]
    scores = score_rankings(ranking[None], [(np.array([1, 2]), np.array([3, 7]))], ks=(1, 5, 10))
    # AP = (0 + 1/3)/4 + (1/3 + 2/4)/4 = 7/24
    assert scores.map == pytest.approx(7 / 24)
    # revisitop's mP@k: k' = min(k, rank of the last positive = 4); P@1 = 0/1, P@5 = P@10 = 2/4.
    assert scores.precision_at == pytest.approx({1: 0.0, 5: 0.5, 10: 0.5})
    # Without junk removal the same ranking scores lower: a check that junk is really ignored.
    plain = score_rankings(ranking[None], [(np.array([1, 2]), np.array([], dtype=int))])
    assert plain.map == pytest.approx(average_precision([3, 5], 2)) and plain.map < scores.map


def test_easy_medium_hard_setups_by_hand() -> None:
    truth = GroundTruth(
        imlist=["a", "b", "c", "d"],
        qimlist=["q0", "q1"],
        queries=[
            QueryTruth(None, easy=np.array([0]), hard=np.array([1]), junk=np.array([2])),
            QueryTruth(None, easy=np.array([3]), hard=np.array([], dtype=int), junk=np.array([], dtype=int)),
        ],
    )
    rankings = np.array([[3, 0, 2, 1], [3, 0, 1, 2]])
    medium = score_rankings(rankings, truth.setup("medium"))
    # q0: junk-free list [3, 0, 1], positives at 1, 2: (0 + 1/2)/4 + (1/2 + 2/3)/4 = 5/12; q1: AP 1.
    assert medium.aps.tolist() == pytest.approx([5 / 12, 1.0])
    assert medium.map == pytest.approx((5 / 12 + 1) / 2)
    hard = score_rankings(rankings, truth.setup("hard"))
    # q0: positives {1}, junk {2, 0}: list [3, 1] → rank 1 → (0 + 1/2)/2; q1 has no hard positive: left out.
    assert hard.aps[0] == pytest.approx(0.25) and np.isnan(hard.aps[1])
    assert hard.map == pytest.approx(0.25)
    easy = score_rankings(rankings, truth.setup("easy"))
    # q0: positives {0}, junk {2, 1}: list [3, 0] → rank 1.
    assert easy.aps.tolist() == pytest.approx([0.25, 1.0])
    with pytest.raises(ValueError, match="protocol"):
        truth.setup("extreme")


def test_ground_truth_reads_the_real_format_and_numpy_arrays(tmp_path: Path) -> None:
    truth = load_ground_truth(FIXTURE / "roxford5k" / "gnd_roxford5k.pkl")
    assert truth.qimlist == ["balliol_000051", "ashmolean_000301"]
    assert len(truth.imlist) == 8 and truth.queries[0].bbx == (10.4, 8.6, 70.3, 60.2)
    assert truth.queries[0].easy.tolist() == [1] and truth.queries[1].junk.tolist() == [4]
    arrays = {
        "imlist": ["x", "y"],
        "qimlist": ["q"],
        "gnd": [
            {
                "bbx": np.array([1.0, 2.0, 3.0, 4.0]),
                "easy": np.array([1]),
                "hard": np.array([], int),
                "junk": [],
            }
        ],
    }
    for protocol in (2, 5):
        path = tmp_path / f"gnd_p{protocol}.pkl"
        path.write_bytes(pickle.dumps(arrays, protocol=protocol))
        assert load_ground_truth(path).queries[0].easy.tolist() == [1]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_ground_truth_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Payload(marker)]}))
    with pytest.raises(ValueError, match="plain-data"):
        load_ground_truth(path)
    assert not marker.exists()
    bad = tmp_path / "gnd_bad.pkl"
    bad.write_bytes(
        pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]})
    )
    with pytest.raises(ValueError, match="outside the database"):
        load_ground_truth(bad)


def test_image_preparation() -> None:
    image = Image.new("RGB", (100, 50))
    assert resize_long_side(image, 64).size == (64, 32)
    # As the DINO script (a thumbnail): small images keep their size; --upscale enlarges them.
    assert resize_long_side(Image.new("RGB", (20, 10)), 64).size == (20, 10)
    assert resize_long_side(Image.new("RGB", (20, 10)), 64, upscale=True).size == (64, 32)
    assert resize_long_side(Image.new("RGB", (64, 10)), 64, upscale=True).size == (64, 10)
    assert crop_box(image, (10.4, 8.6, 70.3, 60.2)).size == (60, 41)  # (10, 9, 70, 50): clipped to the image
    with pytest.raises(ValueError, match="empty"):
        crop_box(image, (90, 10, 80, 30))


def test_batches_group_equal_sizes_and_keep_every_index() -> None:
    items = [(i, torch.zeros(3, 4 + (i % 2), 4)) for i in range(7)]
    batches = list(batches_by_size(iter(items), batch_size=2))
    seen = sorted(i for indices, _ in batches for i in indices)
    assert seen == list(range(7))
    for indices, images in batches:
        assert images.shape[0] == len(indices) <= 2
        assert all(items[i][1].shape == images.shape[1:] for i in indices)
    # Many sizes, few images each: partial batches are flushed once more than max_pending wait.
    mixed = [(i, torch.zeros(3, 4 + i % 5, 4)) for i in range(20)]
    seen = [i for indices, _ in batches_by_size(iter(mixed), batch_size=10, max_pending=3) for i in indices]
    assert sorted(seen) == list(range(20))
    first = next(batches_by_size(iter(mixed), batch_size=10, max_pending=3))
    assert len(first[0]) == 1 and first[0] == [0]  # emitted when the 4th image arrived


def test_locate_accepts_the_root_or_the_dataset_folder(tmp_path: Path) -> None:
    for data in (FIXTURE, FIXTURE / "roxford5k"):
        found = RevisitedDataset.locate(data, "roxford5k")
        assert found.images == FIXTURE / "roxford5k" / "jpg"
    assert RevisitedDataset.locate(FIXTURE / "roxford5k").name == "roxford5k"
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k"):
        RevisitedDataset.locate(FIXTURE, "rparis6k")


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "backbone.pth"
    torch.save(vit("tiny", patch_size=8, img_size=32, depth=1).state_dict(), path)
    return path


@pytest.mark.parametrize(
    "model_args", [["--weights", "VIT"], ["--weights", "torchvision:resnet18", "--random-init"]]
)
def test_retrieval_command_end_to_end(
    tmp_path: Path, tiny_vit_file: Path, model_args: list[str], capsys
) -> None:
    """In the fixture every positive and junk image is a copy of its query's box, junk first in the database:
    any model ranks the copies first, and only junk removal makes every setup perfect."""
    model_args = [str(tiny_vit_file) if a == "VIT" else a for a in model_args]
    out = tmp_path / "retrieval.json"
    rc = main(
        ["retrieval", "--data", str(FIXTURE), "--dataset", "roxford5k", "--imsize", "64", "--multiscale",
         "--query-crop", "--device", "cpu", "--num-workers", "0", "--quiet", "--output", str(out), *model_args]
    )  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["query_crop"] is True
    for setup in ("medium", "hard"):
        assert results[setup] == {"mAP": 100.0, "mP@1": 100.0, "mP@5": 100.0, "mP@10": 100.0}
    assert set(results["per_query"]) == {"balliol_000051", "ashmolean_000301"}
    printed = capsys.readouterr().out
    assert "medium.mAP" in printed and "per_query" not in printed


def test_retrieval_command_checks_files_first(tmp_path: Path, capsys) -> None:
    (tmp_path / "roxford5k" / "jpg").mkdir(parents=True)
    (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(
        (FIXTURE / "roxford5k" / "gnd_roxford5k.pkl").read_bytes()
    )
    rc = main(["retrieval", "--data", str(tmp_path), "--weights", "does-not-matter.pth"])
    assert rc == 2
    assert "10 of 10 images are missing" in capsys.readouterr().err


def test_queries_are_used_whole_by_default_as_the_papers_script_does() -> None:
    """The paper's retrieval table comes from the DINO script, which does not crop the queries to their
    box; the revisitop protocol's crop is an option (its numbers are not comparable with the paper's)."""
    import inspect

    from dino.cli import parse_args
    from dino.eval.retrieval import evaluate_retrieval

    assert inspect.signature(evaluate_retrieval).parameters["crop_queries"].default is False
    args = parse_args(["retrieval", "--data", "d", "--weights", "w.pth"])
    assert args.query_crop is False
    assert parse_args(["retrieval", "--data", "d", "--weights", "w.pth", "--query-crop"]).query_crop is True


def _rotated_jpeg(path: Path) -> Path:
    """A 20 × 10 JPEG, red on the left, blue on the right, whose EXIF says to rotate it 90° clockwise."""
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10, 0], pixels[:, 10:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(pixels).save(path, exif=exif, quality=100, subsampling=0)
    return path


def test_images_are_read_as_the_dino_script_reads_them_by_default(tmp_path: Path) -> None:
    """No EXIF rotation and no enlargement, unless asked: a tagged 20 × 10 file stays 20 wide, red on the
    left; with exif_transpose it is 10 wide and 20 high, red on top; with upscale its long side is imsize."""
    path = _rotated_jpeg(tmp_path / "tagged.jpg")
    plain = RetrievalImages([path], imsize=64, mean=(0, 0, 0), std=(1, 1, 1))[0][1]
    assert plain.shape == (3, 10, 20)
    assert plain[0, 5, 2] > 0.9 and plain[2, 5, 2] < 0.1 and plain[2, 5, 17] > 0.9
    turned = RetrievalImages([path], 64, mean=(0, 0, 0), std=(1, 1, 1), exif_transpose=True)[0][1]
    assert turned.shape == (3, 20, 10)
    assert turned[0, 2, 5] > 0.9 and turned[2, 17, 5] > 0.9
    assert RetrievalImages([path], 64, upscale=True)[0][1].shape == (3, 32, 64)
    from dino.cli import parse_args

    args = parse_args(["retrieval", "--data", "d", "--weights", "w.pth"])
    assert args.upscale is False and args.exif_rotate is False
    args = parse_args(["retrieval", "--data", "d", "--weights", "w.pth", "--upscale", "--exif-rotate"])
    assert args.upscale is True and args.exif_rotate is True
