"""Tests for dino.data.datasets: layout detection, odd pixel modes, broken files, fail-fast checks."""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.data import (
    DatasetError,
    EvalTransform,
    ImageFolderDataset,
    MultiCropAugmentation,
    SkippedImageWarning,
    check_usable,
    collate_skipping_bad,
    sample_dataset,
)


def _save_rgb(
    path: Path, size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 30, 30)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jpeg_bytes(size: tuple[int, int] = (48, 48)) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels: enough for PIL's size check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def _load_quietly(dataset: ImageFolderDataset, index: int):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item = dataset[index]
    return item, caught


def _item(dataset: ImageFolderDataset, name: str):
    (index,) = [i for i, (p, _) in enumerate(dataset.samples) if p.name == name]
    return _load_quietly(dataset, index)


# --- layout detection ---------------------------------------------------------------------------


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.PNG", "c.JpEg"):
        _save_rgb(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    ds = ImageFolderDataset(tmp_path)
    assert not ds.labelled and ds.classes == []
    assert [p.name for p, _ in ds.samples] == ["a.PNG", "b.jpg", "c.JpEg"]
    assert {label for _, label in ds.samples} == {-1}


def test_mixed_nested_folder_is_unlabelled(tmp_path: Path) -> None:
    _save_rgb(tmp_path / "top.jpg")
    _save_rgb(tmp_path / "sub" / "deeper" / "x.png")
    ds = ImageFolderDataset(tmp_path)
    assert not ds.labelled and ds.classes == [] and len(ds) == 2
    with pytest.raises(DatasetError, match="class sub-folder"):
        ImageFolderDataset(tmp_path, labelled=True)


def test_class_folders_are_labelled(tmp_path: Path) -> None:
    _save_rgb(tmp_path / "dog" / "1.jpg")
    _save_rgb(tmp_path / "cat" / "2.png")
    _save_rgb(tmp_path / "cat" / "nested" / "3.bmp")
    (tmp_path / "empty_class").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.labelled and ds.classes == ["cat", "dog"]
    assert [(p.relative_to(tmp_path).as_posix(), y) for p, y in ds.samples] == [
        ("cat/2.png", 0),
        ("cat/nested/3.bmp", 0),
        ("dog/1.jpg", 1),
    ]
    item, caught = _load_quietly(ds, 2)
    assert item is not None and item[1] == 1 and isinstance(item[0], Image.Image) and not caught
    forced = ImageFolderDataset(tmp_path, labelled=False)
    assert not forced.labelled and forced.classes == [] and {y for _, y in forced.samples} == {-1}


def test_unusable_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    file_path = _save_rgb(tmp_path / "file.jpg")
    with pytest.raises(DatasetError, match="not a folder"):
        ImageFolderDataset(file_path)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=re.escape(str(empty))):
        ImageFolderDataset(empty)


# --- decoding every pixel mode ------------------------------------------------------------------


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """A flat folder of good-but-odd and broken images, generated on the fly."""
    root = tmp_path / "corpus"
    root.mkdir()
    good = _jpeg_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a JPEG\n")
    (root / "bomb.png").write_bytes(_png_header_only(20_000, 20_000))  # over PIL's hard limit
    (root / "big.png").write_bytes(_png_header_only(10_000, 10_000))  # over the default max_pixels only

    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # red
    gray16 = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    Image.fromarray(gray16).save(root / "gray16.png")
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(root / "palette_transparent.png", transparency=0)
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    rgba.save(root / "rgba.png")
    Image.new("L", (3, 3), 77).save(root / "gray8.png")
    Image.new("1", (3, 3), 1).save(root / "onebit.png")
    rotated = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "exif_rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (255, 255, 0)).save(root / "tiny.png")
    return root


BROKEN = ("truncated.jpg", "zero.jpg", "text.jpg", "bomb.png", "big.png")


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_are_skipped_with_one_warning(corpus: Path, name: str) -> None:
    item, caught = _item(ImageFolderDataset(corpus), name)
    assert item is None
    assert len(caught) == 1 and issubclass(caught[0].category, SkippedImageWarning)
    assert name in str(caught[0].message)


def test_zero_byte_reason_is_specific(corpus: Path) -> None:
    _, caught = _item(ImageFolderDataset(corpus), "zero.jpg")
    assert "empty" in str(caught[0].message)


def test_max_pixels_skips_large_images_without_touching_pil_globals(corpus: Path) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    ds = ImageFolderDataset(corpus, max_pixels=10)
    item, caught = _item(ds, "gray8.png")  # 9 pixels: fine
    assert item is not None and not caught
    item, caught = _item(ds, "exif_rotated.jpg")  # 800 pixels: too many
    assert item is None and len(caught) == 1 and "decompression bomb" in str(caught[0].message)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def _rgb(corpus: Path, name: str) -> np.ndarray:
    item, caught = _item(ImageFolderDataset(corpus), name)
    assert item is not None and not caught, [str(w.message) for w in caught]
    img = item[0]
    assert img.mode == "RGB"
    return np.asarray(img)


def test_cmyk_becomes_rgb(corpus: Path) -> None:
    pixels = _rgb(corpus, "cmyk.jpg").astype(int)
    r, g, b = pixels[..., 0].mean(), pixels[..., 1].mean(), pixels[..., 2].mean()
    assert r > 200 and g < 60 and b < 60


def test_16bit_gray_is_scaled_not_clipped(corpus: Path) -> None:
    pixels = _rgb(corpus, "gray16.png")
    assert pixels[..., 0].tolist() == [[0, 255], [128, 1]]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()


def test_transparency_is_composited_on_white(corpus: Path) -> None:
    assert _rgb(corpus, "palette_transparent.png").tolist() == [[[255, 255, 255], [0, 255, 0]]]
    assert _rgb(corpus, "rgba.png").tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_gray_and_one_bit(corpus: Path) -> None:
    assert (_rgb(corpus, "gray8.png") == 77).all()
    assert (_rgb(corpus, "onebit.png") == 255).all()


def test_exif_orientation_is_applied(corpus: Path) -> None:
    pixels = _rgb(corpus, "exif_rotated.jpg")
    assert pixels.shape == (40, 20, 3)  # stored 40 wide x 20 high, displayed 20 wide x 40 high


def test_one_pixel_image_through_multicrop(corpus: Path) -> None:
    aug = MultiCropAugmentation(local_crops_number=2, global_crop_size=16, local_crop_size=8)
    item, caught = _item(ImageFolderDataset(corpus, transform=aug), "tiny.png")
    assert item is not None and not caught
    assert [tuple(c.shape) for c in item[0]] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2


# --- collation and fail-fast --------------------------------------------------------------------


def test_collate_counts_skipped_items(corpus: Path) -> None:
    ds = ImageFolderDataset(corpus, transform=EvalTransform(resize=8, crop_size=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = [ds[i] for i in range(len(ds))]
    assert len(caught) == len(BROKEN)
    images, labels, skipped = collate_skipping_bad(batch)
    assert skipped == len(BROKEN)
    assert isinstance(images, torch.Tensor) and images.shape == (len(ds) - len(BROKEN), 3, 8, 8)
    assert labels.dtype == torch.long and labels.tolist() == [-1] * (len(ds) - len(BROKEN))


def test_collate_multicrop_and_all_bad() -> None:
    item = ([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), torch.ones(3, 2, 2)], 3)
    images, labels, skipped = collate_skipping_bad([item, None, item])
    assert isinstance(images, list) and [tuple(t.shape) for t in images] == [(2, 3, 4, 4)] * 2 + [
        (2, 3, 2, 2)
    ]
    assert labels.tolist() == [3, 3] and skipped == 1
    images, labels, skipped = collate_skipping_bad([None, None])
    assert images == [] and labels.numel() == 0 and skipped == 2


def test_check_usable_raises_when_most_files_fail(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"garbage")
    _save_rgb(tmp_path / "good.jpg")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DatasetError, match=r"3 of 4 sampled failed, more than the 50% .*bad0\.jpg"):
        check_usable(ds)
    with pytest.raises(DatasetError, match=r"too many files .* 3 of 4 sampled failed, more than the 10%"):
        check_usable(ds, min_valid_fraction=0.9)  # not "most": 3 of 4 against a 10 % allowance
    report = check_usable(ds, min_valid_fraction=0.25)
    assert report.checked == 4 and len(report.failures) == 3
    _save_rgb(tmp_path / "good2.jpg")
    _save_rgb(tmp_path / "good3.jpg")
    assert len(check_usable(ImageFolderDataset(tmp_path)).failures) == 3  # 3 of 6: exactly the limit


@pytest.mark.parametrize("bad, fraction", [(1, 0.9), (2, 0.8), (3, 0.7)])
def test_check_usable_accepts_exactly_the_allowed_failures(tmp_path: Path, bad: int, fraction: float) -> None:
    """1 - 0.9 is 0.0999… in floats: 1 failure of 10 must still be within a 10 % allowance."""
    for i in range(bad):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"")
    for i in range(10 - bad):
        _save_rgb(tmp_path / f"good{i}.jpg")
    assert len(check_usable(ImageFolderDataset(tmp_path), min_valid_fraction=fraction).failures) == bad
    (tmp_path / "bad_extra.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="too many files"):
        check_usable(ImageFolderDataset(tmp_path), min_valid_fraction=fraction, sample_size=11)


def test_symbolic_links_dangling_files_and_linked_class_folders(tmp_path: Path, caplog) -> None:
    for cls in ("dog", "zcat"):
        (tmp_path / cls).mkdir()
        _save_rgb(tmp_path / cls / "a.jpg")
    (tmp_path / "cat").symlink_to(tmp_path / "zcat", target_is_directory=True)  # the same folder twice
    (tmp_path / "dog" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level("WARNING", logger="dino.data.datasets"):
        ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 2  # zcat's image once, the dangling link left out
    assert "a symbolic link to a file that does not exist" in caplog.text
    assert "are the same folder" in caplog.text


# --- bundled sample -----------------------------------------------------------------------------


def test_sample_dataset_splits() -> None:
    assert sample_dataset() == sample_dataset("train")
    train, val = ImageFolderDataset(sample_dataset("train")), ImageFolderDataset(sample_dataset("val"))
    assert len(train) == 4000 and len(val) == 1000
    assert train.classes == val.classes and len(train.classes) == 10
    assert np.bincount([y for _, y in val.samples]).tolist() == [100] * 10
    train_names = {p.relative_to(train.root) for p, _ in train.samples}
    assert not train_names & {p.relative_to(val.root) for p, _ in val.samples}
    with pytest.raises(ValueError, match="unknown sample split"):
        sample_dataset("test")


def _smooth_photo(path: Path, size: tuple[int, int], exif: bytes | None = None) -> Path:
    """A smooth (photo-like) JPEG: random 8×6 colours upscaled bicubically."""
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    small.resize(size, Image.Resampling.BICUBIC).save(path, quality=92, **({"exif": exif} if exif else {}))
    return path


def test_reduced_decoding_picks_the_largest_dct_scale_the_factor_allows(tmp_path: Path) -> None:
    from dino.data.datasets import load_rgb

    jpeg = _smooth_photo(tmp_path / "a.jpg", (640, 480))
    assert load_rgb(jpeg, reduction=lambda w, h: 4.0).size == (160, 120)
    assert load_rgb(jpeg, reduction=lambda w, h: 3.0).size == (320, 240)  # 1/4 would be too small
    assert load_rgb(jpeg, reduction=lambda w, h: 1.9).size == (640, 480)
    assert load_rgb(jpeg, reduction=lambda w, h: 100.0).size == (80, 60)  # 1/8 is libjpeg's smallest
    png = tmp_path / "a.png"
    Image.open(jpeg).save(png)
    assert load_rgb(png, reduction=lambda w, h: 4.0).size == (640, 480)  # only JPEGs have DCT scaling
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: the reduced image is rotated too
    rotated = _smooth_photo(tmp_path / "r.jpg", (640, 480), exif.tobytes())
    assert load_rgb(rotated, reduction=lambda w, h: 4.0).size == (120, 160)
    # A reduced decode looks like the full one after the crop's downscaling.
    full = np.asarray(load_rgb(jpeg).resize((96, 72), Image.Resampling.BICUBIC), dtype=np.float64)
    small = np.asarray(
        load_rgb(jpeg, reduction=lambda w, h: 4.0).resize((96, 72), Image.Resampling.BICUBIC),
        dtype=np.float64,
    )
    assert np.abs(full - small).mean() < 2.0


@pytest.mark.parametrize(
    "size", [(500, 375), (1000, 750), (2000, 1500), (4000, 3000), (3000, 400), (300, 4000), (8000, 1200)]
)
def test_multicrop_decode_reduction_never_leaves_a_crop_smaller_than_its_output(size) -> None:
    from torchvision.transforms import RandomResizedCrop

    augment = MultiCropAugmentation()
    width, height = size
    factor = augment.decode_reduction(width, height)
    scale = next(s for s in (8, 4, 2, 1) if s <= factor or s == 1)  # the DCT scale PIL's draft picks
    w, h = -(-width // scale), -(-height // scale)
    torch.manual_seed(0)
    for crop_scale, out in ((augment.global_crops_scale, 224), (augment.local_crops_scale, 96)):
        sides = [min(RandomResizedCrop.get_params(torch.empty(3, h, w), crop_scale, (3 / 4, 4 / 3))[2:])
                 for _ in range(2000)]  # fmt: skip
        if scale > 1:  # a reduced decode: every crop still has at least the pixels it outputs
            assert min(sides) >= out
        # The bound itself, worked out here: the smallest crop side (smallest area at ratio 3/4, or the
        # shorter image side) of the reduced image still covers the output.
        smallest = min(math.sqrt(crop_scale[0] * w * h * 3 / 4), w, h)
        assert scale == 1 or smallest >= out
    # ImageNet-sized images: local crops (5 % of the area) need every pixel. Elongated ones: the shorter
    # side bounds the global crops (400 / 224 and 300 / 224 < 2: no reduction; 1200 / 224 > 4: 4 times).
    expected_scale = {(500, 375): 1, (1000, 750): 1, (2000, 1500): 2, (4000, 3000): 4, (3000, 400): 1,
                      (300, 4000): 1, (8000, 1200): 4}  # fmt: skip
    assert scale == expected_scale[size]


def test_training_uses_reduced_decoding_unless_turned_off(tmp_path: Path) -> None:
    from dino.config import load_config
    from dino.train.data import build_train_data

    _smooth_photo(tmp_path / "data" / "a.jpg", (2000, 1500))
    _smooth_photo(tmp_path / "data" / "b.jpg", (2000, 1500))
    common = [f"data.path={tmp_path / 'data'}", "data.augment_on=workers", "run.batch_size=1"]
    on = build_train_data(load_config(None, common), 0, 1, torch.device("cpu")).dataset
    off = build_train_data(
        load_config(None, [*common, "data.reduced_decode=false"]), 0, 1, torch.device("cpu")
    )
    assert on.decode_reduction is not None and off.dataset.decode_reduction is None
    assert on.decode_reduction(2000, 1500) == pytest.approx(
        MultiCropAugmentation().decode_reduction(2000, 1500)
    )
    views, _ = on[0]
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8


def test_samples_are_two_arrays_that_read_back_as_paths_and_labels(tmp_path):
    """The (path, label) list lives in two numpy arrays (forked loader workers would copy a list of
    Python objects page by page as they touch it); reads give the same paths and labels, including a
    file name that is not valid UTF-8, and slices."""
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    for name, cls in [("a.png", "cat"), (odd, "cat"), ("b.png", "dog")]:
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / cls / name, format="PNG")
    ds = ImageFolderDataset(tmp_path)
    assert isinstance(ds.samples.labels, np.ndarray) and ds.samples.labels.dtype == np.int64
    expected = sorted(
        [(tmp_path / "cat" / "a.png", 0), (tmp_path / "cat" / odd, 0), (tmp_path / "dog" / "b.png", 1)]
    )
    assert sorted(ds.samples) == expected
    assert all(path.is_file() for path, _ in ds.samples)
    assert ds.samples[1:] == list(ds.samples)[1:] and len(ds.samples) == 3
