"""Feature representations from one forward pass, feature files, and extraction over folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import EvalTransform
from dino.eval.copy_detection import copy_descriptor
from dino.eval.features import (
    DEFAULT_GEM_P,
    FeatureSet,
    Representation,
    check_representations,
    compute_representations,
    default_representations,
    extract_features,
    extract_representations,
    gem_pool,
    linear_representation,
    paper_linear_representation,
)
from dino.models.backbones import build_backbone


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model, _ = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=3)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_representation_names_and_dims():
    assert Representation.parse("cls").parts == (("cls", 1),)
    assert Representation.parse("cls_last4+mean").parts == (("cls", 4), ("mean", 0))
    assert Representation.parse("cls+gem").dim(384) == 768
    assert Representation.parse("cls_last4").dim(384) == 1536
    assert Representation.parse("cls_last3+mean").blocks_needed == 3
    for bad in ("avg", "cls_last", "cls+", "cls_last0"):
        with pytest.raises(ValueError):
            Representation.parse(bad)


def test_paper_linear_choice():
    assert paper_linear_representation(384, 12) == "cls_last4"  # ViT-S: last 4 [CLS]
    assert paper_linear_representation(768, 12) == "cls+mean"  # ViT-B: last [CLS] + mean patch token
    assert paper_linear_representation(192, 2) == "cls_last2"  # shallow ViT: all its blocks
    assert paper_linear_representation(2048, 0) == "cls"  # ResNet: pooled output
    assert linear_representation(4, True) == "cls_last4+mean"
    assert linear_representation(1, False) == "cls"


def test_vit_representations_match_direct_computation(vit, images):
    names = ["cls", "cls_last2", "cls+mean", "gem", "cls_last3+gem"]
    out = compute_representations(vit, images, [Representation.parse(n) for n in names], gem_p=3.0)
    with torch.no_grad():
        final = vit.forward_features(images)
        layers = vit.get_intermediate_layers(images, 3)
        cls = vit(images)
    torch.testing.assert_close(out["cls"], cls)
    torch.testing.assert_close(out["cls_last2"], torch.cat([layers[1][:, 0], layers[2][:, 0]], 1))
    torch.testing.assert_close(out["cls+mean"], torch.cat([cls, final[:, 1:].mean(1)], 1))
    patches = final[:, 1:]
    gem = patches.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)
    torch.testing.assert_close(out["gem"], gem)
    torch.testing.assert_close(out["cls_last3+gem"][:, -192:], gem)
    assert out["cls_last3+gem"].shape == (2, 4 * 192)


def test_gem_by_hand():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, -5.0]]])  # negatives are clamped to eps
    expected = torch.tensor([[((1 + 27) / 2) ** (1 / 3), ((8 + 1e-18) / 2) ** (1 / 3)]])
    torch.testing.assert_close(gem_pool(tokens, 3.0), expected)
    # The default exponent is the paper's copy-detection p = 4; ``dim`` picks the pooled axis.
    assert DEFAULT_GEM_P == 4.0
    torch.testing.assert_close(gem_pool(tokens), torch.tensor([[((1 + 81) / 2) ** 0.25, (16 / 2) ** 0.25]]))
    torch.testing.assert_close(gem_pool(tokens.transpose(1, 2), dim=2), gem_pool(tokens))


def test_cls_gem_is_the_copy_detection_descriptor(vit, images):
    # ViT: [CLS] ⊕ GeM(p=4) of the final patch tokens, the same numbers from both code paths.
    out = compute_representations(vit, images, [Representation.parse("cls+gem")])
    torch.testing.assert_close(out["cls+gem"], copy_descriptor(vit, images))
    # ResNet: the copy-detection descriptor is GeM(p=4) of the last feature map, i.e. ``gem``.
    model, _ = build_backbone("resnet18")
    model.eval()
    big = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # a 2x2 feature map
    out = compute_representations(model, big, [Representation.parse("gem")])
    torch.testing.assert_close(out["gem"], copy_descriptor(model, big))


def test_resnet_representations(images):
    model, dim = build_backbone("resnet18")
    model.eval()
    out = compute_representations(
        model, images, [Representation.parse(n) for n in ("cls", "gem", "cls+mean")]
    )
    with torch.no_grad():
        torch.testing.assert_close(out["cls"], model(images))
    assert out["gem"].shape == (2, dim) and out["cls+mean"].shape == (2, 2 * dim)
    assert default_representations(model) == ["cls", "gem"]
    with pytest.raises(ValueError, match="not a ViT"):
        check_representations(model, ["cls_last4"])


def test_check_representations_refuses_too_many_blocks(vit):
    assert default_representations(vit) == ["cls", "cls_last3", "cls+mean", "gem"]
    with pytest.raises(ValueError, match="last 4 blocks but the model has 3"):
        check_representations(vit, ["cls_last4"])


def _feature_set() -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    return FeatureSet(
        {"cls": torch.randn(4, 3, generator=g), "cls+mean": torch.randn(4, 6, generator=g)},
        torch.tensor([0, 1, 1, 0]),
        ["a/1.jpg", "b/2.jpg", "b/3.jpg", "a/4.jpg"],
        ["a", "b"],
        {"model": {"arch": "vit_tiny", "depth": 3}, "transform": {"crop_size": 32}},
    )


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_feature_file_round_trip(tmp_path, suffix):
    fs = _feature_set()
    path = fs.save(tmp_path / f"feats{suffix}")
    back = FeatureSet.load(path)
    assert back.paths == fs.paths and back.classes == fs.classes and back.meta == fs.meta
    assert torch.equal(back.labels, fs.labels)
    for name in fs.features:
        torch.testing.assert_close(back.features[name], fs.features[name])
    if suffix == ".pt":  # plain data: readable without allowing arbitrary objects
        raw = torch.load(path, weights_only=True)
        assert raw["format"] == "dino-features"
    else:
        assert set(np.load(path, allow_pickle=False).files) >= {
            "labels",
            "paths",
            "classes",
            "meta",
            "feature:cls",
        }


def test_pt_feature_files_are_memory_mapped(tmp_path, monkeypatch):
    fs = _feature_set()
    path = fs.save(tmp_path / "feats.pt")
    legacy = tmp_path / "legacy.pt"  # the same content in torch's pre-zip format, which cannot be mapped
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    real_load, calls = torch.load, []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for file, mapped in ((path, True), (legacy, False)):
        back = FeatureSet.load(file)
        assert calls[-1]["mmap"] is mapped and calls[-1]["weights_only"] is True
        assert back.paths == fs.paths and back.meta == fs.meta and torch.equal(back.labels, fs.labels)
        for name, value in fs.features.items():
            assert torch.equal(back.features[name], value)
        # A mapped set subsets like an in-memory one.
        assert torch.equal(back.only("cls").subset([2, 0]).get("cls"), fs.features["cls"][[2, 0]])


def test_feature_file_errors(tmp_path):
    with pytest.raises(ValueError, match=".pt or .npz"):
        _feature_set().save(tmp_path / "x.txt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a feature file"):
        FeatureSet.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="stored: cls, cls\\+mean"):
        _feature_set().get("gem")


def test_only_keeps_one_representation_before_subsetting():
    fs = _feature_set()
    one = fs.only("cls+mean")
    assert list(one.features) == ["cls+mean"]
    assert one.get("cls+mean") is fs.get("cls+mean")  # shared, not copied
    sub, before = one.subset([3, 1]), fs.subset([3, 1])
    assert list(sub.features) == ["cls+mean"]  # the other representation is not carried (nor copied)
    assert torch.equal(sub.get("cls+mean"), before.get("cls+mean"))
    assert torch.equal(sub.get("cls+mean"), fs.get("cls+mean")[[3, 1]])
    assert sub.paths == before.paths and sub.classes == before.classes and sub.meta == before.meta
    assert torch.equal(sub.labels, before.labels)
    with pytest.raises(ValueError, match="stored: cls, cls\\+mean"):
        fs.only("gem")


def test_subset_and_relabel():
    fs = _feature_set()
    sub = fs.subset([3, 1])
    assert sub.paths == ["a/4.jpg", "b/2.jpg"] and sub.labels.tolist() == [0, 1]
    torch.testing.assert_close(sub.features["cls"], fs.features["cls"][[3, 1]])
    moved = fs.relabelled(["z", "b", "a"])
    assert moved.labels.tolist() == [2, 1, 1, 2]
    with pytest.raises(ValueError, match="not among the training classes"):
        fs.relabelled(["a"])


def _folder(root, broken: bool):
    g = np.random.default_rng(0)
    for c, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = (g.random((20 + 4 * i, 24, 3)) * 80 + 120 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    if broken:
        (root / "dogs" / "9_broken.jpg").write_bytes(b"not an image")
    return root


def test_extract_over_a_folder_skips_broken_files(tmp_path, vit):
    root = _folder(tmp_path / "data", broken=True)
    ds = ImageFolderDataset(root, transform=EvalTransform(resize=36, crop_size=32), labelled=True)
    with pytest.warns(UserWarning, match="9_broken"):
        fs = extract_representations(vit, ds, torch.device("cpu"), ["cls", "cls_last2+mean"], batch_size=4)
    assert len(fs) == 6 and fs.classes == ["cats", "dogs"]
    assert fs.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert all("broken" not in p for p in fs.paths) and fs.paths[3].endswith("dogs/0.png")
    assert fs.features["cls_last2+mean"].shape == (6, 3 * 192)
    # The same [CLS] as the plain extraction the training monitor uses, in the same order.
    with pytest.warns(UserWarning):
        cls, labels = extract_features(vit, ds, torch.device("cpu"), batch_size=3)
    torch.testing.assert_close(cls, fs.features["cls"])
    assert torch.equal(labels, fs.labels)
    # Extraction of chosen samples only (used for the linear probe's validation split).
    part = extract_representations(vit, ds, torch.device("cpu"), ["cls"], indices=[4, 1])
    assert part.paths == [fs.paths[4], fs.paths[1]]
    torch.testing.assert_close(part.features["cls"], fs.features["cls"][[4, 1]])
