"""End-to-end runs of ``dino extract / knn / lowshot / linear`` on images from the bundled sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dino.cli import main
from dino.cli.output import write_results
from dino.data.datasets import ImageFolderDataset
from dino.data.sample import sample_dataset
from dino.data.transforms import EvalTransform
from dino.devices import resolve_device
from dino.eval.copy_detection import copy_descriptor
from dino.eval.features import FeatureSet
from dino.eval.lowshot import lowshot_evaluate
from dino.hub import training_image_settings
from dino.models.backbones import build_backbone

CLASSES = ("airplane", "automobile", "bird")
CPU = ["--device", "cpu", "--num-workers", "0", "--batch-size", "16"]


def _copy(split: str, dest: Path, per_class: int, classes=CLASSES) -> Path:
    source = sample_dataset(split)
    for name in classes:
        (dest / name).mkdir(parents=True)
        for image in sorted((source / name).iterdir())[:per_class]:
            shutil.copy(image, dest / name / image.name)
    return dest


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    model, _ = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1)
    torch.save(model.state_dict(), root / "backbone.pth")
    return {
        "train": _copy("train", root / "train", 8),
        "test": _copy("val", root / "test", 3),
        "birds": _copy("val", root / "birds", 2, classes=("bird",)),
        "weights": root / "backbone.pth",
    }


@pytest.fixture(scope="module")
def cached(data, tmp_path_factory) -> dict[str, Path]:
    """Feature files of the three folders, written once by `dino extract`."""
    root = tmp_path_factory.mktemp("features")
    files = {"train": root / "train.pt", "test": root / "test.npz", "birds": root / "birds.pt"}
    for folder, out in files.items():
        assert (
            main(["extract", str(data[folder]), "--weights", str(data["weights"]), "--out", str(out), *CPU])
            == 0
        )
    return files


def _run(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def _results(path: Path) -> dict:
    return json.loads(path.read_text())


def _independent_knn_top1(train: FeatureSet, test: FeatureSet, k: int, temperature: float = 0.07) -> float:
    b = train.features["cls"].double().numpy()
    q = test.features["cls"].double().numpy()
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ b.T
    correct = 0
    for i, row in enumerate(sims):
        votes = np.zeros(len(train.classes))
        for j in np.argsort(-row)[:k]:
            votes[train.labels[j]] += np.exp(row[j] / temperature)
        correct += int(votes.argmax() == test.labels[i])
    return 100 * correct / len(q)


def test_extract_writes_every_representation(data, cached, tmp_path, capsys):
    fs = FeatureSet.load(cached["train"])
    assert len(fs) == 24 and fs.classes == list(CLASSES)
    assert {name: f.shape[1] for name, f in fs.features.items()} == {"cls": 192, "cls+mean": 384, "gem": 192}
    # The crop defaults to the model's training size (32, from its position embeddings), resize to 32 * 8/7.
    assert fs.meta["transform"]["crop_size"] == 32 and fs.meta["transform"]["resize"] == 37
    assert fs.meta["model"]["arch"] == "vit_tiny" and fs.meta["model"]["depth"] == 1
    out = tmp_path / "t.npz"
    args = ["--representations", "cls+gem", "--output", tmp_path / "e.json", *CPU]
    code, text = _run(["extract", data["birds"], "--weights", data["weights"], "--out", out, *args], capsys)
    assert code == 0, text
    assert list(FeatureSet.load(out).features) == ["cls+gem"]
    assert _results(tmp_path / "e.json")["images"] == 2


def test_extracted_cls_and_gem_are_the_copy_detection_descriptor(data, cached):
    """`dino extract`'s default ``gem`` (p = 4) with ``cls`` is copy detection's descriptor of the same images."""
    fs = FeatureSet.load(cached["birds"])
    assert fs.meta["gem_p"] == 4.0
    model, _ = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1)
    model.load_state_dict(torch.load(data["weights"], weights_only=True))
    t = fs.meta["transform"]
    dataset = ImageFolderDataset(
        data["birds"], EvalTransform(t["resize"], t["crop_size"], t["mean"], t["std"]), labelled=True
    )
    assert [str(path) for path, _ in dataset.samples] == fs.paths
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    expected = copy_descriptor(model.eval(), images)
    torch.testing.assert_close(torch.cat([fs.get("cls"), fs.get("gem")], dim=1), expected)


def _write_features(path: Path, features: torch.Tensor, labels: list[int], classes: list[str]) -> Path:
    """A feature file by hand: ``features`` as ``cls``, plus a decoy ``cls+mean`` the commands must not use."""
    return FeatureSet(
        {"cls": features, "cls+mean": torch.full((len(labels), 3), float("nan"))},
        torch.tensor(labels),
        [f"{classes[c]}/{i}.png" for i, c in enumerate(labels)],
        classes,
    ).save(path)


def test_knn_top1_and_top5_by_hand(tmp_path, capsys):
    """Seven classes, so top-5 can miss. The bank is one unit vector per class; every query is the same
    vector whose similarity to class c decreases with c, so k >= 5 votes rank the classes 0, 1, …, 6."""
    classes = [f"c{i}" for i in range(7)]
    train = _write_features(tmp_path / "train.pt", torch.eye(7), list(range(7)), classes)
    query = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25]).repeat(3, 1)
    # Labelled 0: top-1 hit. Labelled 4: ranked 5th, a top-5 hit only. Labelled 6: ranked 7th, both miss.
    test = _write_features(tmp_path / "test.npz", query, [0, 4, 6], classes)
    out = tmp_path / "knn.json"
    args = ["--train-features", train, "--test-features", test, "--ks", 5, 7, "--output", out]
    code, text = _run(["knn", *args, "--device", "cpu"], capsys)
    assert code == 0, text
    results = _results(out)
    for k in (5, 7):
        assert results[f"k={k}"] == pytest.approx({"top1": 100 / 3, "top5": 200 / 3})


def test_linear_on_feature_files_by_hand(tmp_path, capsys):
    """Seven well-separated classes (around 4·e_c): any trained probe classifies e_c as c, and puts the five
    classes of 4·(e_0 + … + e_4) ahead of class 6, so that test image, labelled 6, misses top-1 and top-5."""
    classes = [f"c{i}" for i in range(7)]
    g = torch.Generator().manual_seed(0)
    labels = [c for c in range(7) for _ in range(20)]
    train = 4 * torch.eye(7)[labels] + 0.1 * torch.randn(len(labels), 7, generator=g)
    test = torch.cat([4 * torch.eye(7), 4 * torch.eye(7)[:5].sum(0, keepdim=True)])
    files = [
        "--train-features",
        _write_features(tmp_path / "train.pt", train, labels, classes),
        "--test-features",
        _write_features(tmp_path / "test.pt", test, [*range(7), 6], classes),
    ]
    out = tmp_path / "linear.json"
    args = ["--representation", "cls", "--epochs", 30, "--lrs", 0.1, 1.0, "--output", out]
    code, text = _run(["linear", *files, *args, "--batch-size", 32, "--device", "cpu"], capsys)
    assert code == 0, text
    results = _results(out)
    # the lr chosen on 14 held-out images, the reported head trained again on all 140
    assert results["train_images"] == 140 and results["val_images"] == 14 and results["classes"] == 7
    assert results["refit"] is True
    assert results["test"] == pytest.approx({"top1": 87.5, "top5": 87.5})  # 7 of 8 right, either way
    code, text = _run(["linear", *files, *args, "--batch-size", 32, "--device", "cpu", "--no-refit"], capsys)
    assert code == 0, text
    sweep_only = _results(out)
    assert sweep_only["refit"] is False and sweep_only["train_images"] == 126
    assert sweep_only["test"] == sweep_only["test_sweep_head"] == results["test_sweep_head"]


def test_knn_on_folders_and_cached_features_agree_with_an_independent_vote(data, cached, tmp_path, capsys):
    out = tmp_path / "knn.json"
    args = ["--weights", data["weights"], "--ks", 1, 5, 20, "--output", out, *CPU]
    code, text = _run(["knn", "--train", data["train"], "--test", data["test"], *args], capsys)
    assert code == 0, text
    assert "| k=5.top1" in text  # the table on stdout
    folders = _results(out)
    assert folders["train_images"] == 24 and folders["test_images"] == 9 and folders["classes"] == 3
    out = tmp_path / "c.json"
    code, text = _run(
        [
            "knn",
            "--train-features",
            cached["train"],
            "--test",
            cached["test"],
            "--ks",
            1,
            5,
            20,
            "--output",
            out,
        ],
        capsys,
    )
    assert code == 0, text
    from_files = _results(out)
    train, test = FeatureSet.load(cached["train"]), FeatureSet.load(cached["test"])
    for k in (1, 5, 20):
        assert from_files[f"k={k}"] == folders[f"k={k}"]
        assert folders[f"k={k}"]["top1"] == pytest.approx(_independent_knn_top1(train, test, k))


def test_knn_maps_test_classes_by_name(data, cached, tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["--weights", data["weights"], "--ks", 3, "--output", out, *CPU]
    code, text = _run(["knn", "--train", data["train"], "--test", data["birds"], *args], capsys)
    assert code == 0, text
    train = FeatureSet.load(cached["train"])
    birds = FeatureSet.load(cached["birds"]).relabelled(train.classes)
    assert birds.labels.tolist() == [2, 2]  # "bird" is class 2 of the train folder, class 0 of its own
    assert _results(out)["k=3"]["top1"] == pytest.approx(_independent_knn_top1(train, birds, 3))
    code, text = _run(["knn", "--train-features", cached["birds"], "--test-features", cached["test"]], capsys)
    assert code == 2 and "not among the training classes" in text


def test_lowshot_command(data, cached, tmp_path, capsys):
    out = tmp_path / "lowshot.json"
    args = ["--fractions", 0.125, 0.5, "--l2", 0.01, "--output", out, *CPU]
    code, text = _run(
        ["lowshot", "--train", data["train"], "--test", data["test"], "--weights", data["weights"], *args],
        capsys,
    )
    assert code == 0, text
    results = _results(out)
    assert results["12.5%"]["labelled_images"] == 3 and results["50%"]["labelled_images"] == 12
    train, test = FeatureSet.load(cached["train"]), FeatureSet.load(cached["test"])
    expected = lowshot_evaluate(
        train.features["cls"], train.labels, test.features["cls"], test.labels, 3, (0.125, 0.5), l2=0.01
    )
    assert results["12.5%"]["top1"] == pytest.approx(expected["12.5%"]["top1"])
    assert results["50%"]["top1"] == pytest.approx(expected["50%"]["top1"])
    code, text = _run(
        ["lowshot", "--train-features", cached["train"], "--test-features", cached["test"], *args], capsys
    )
    assert code == 0, text
    assert _results(out)["50%"] == results["50%"]


def test_linear_command_augmented_and_fast(data, cached, tmp_path, capsys):
    out = tmp_path / "linear.json"
    common = ["--epochs", 2, "--lrs", 0.01, 1.0, "--weights", data["weights"], "--output", out, *CPU]
    code, text = _run(["linear", "--train", data["train"], "--test", data["test"], *common], capsys)
    assert code == 0, text
    results = _results(out)
    assert results["mode"] == "augmented" and results["representation"] == "cls"  # 1 block: its [CLS]
    assert results["train_images"] == 24 and results["val_images"] == 3 and results["test_images"] == 9
    assert results["best_lr"] in (0.01, 1.0) and set(results["val_top1"]) == {"lr=0.01", "lr=1"}
    hits = results["test"]["top1"] * 9 / 100  # top-1 is a count of the 9 test images
    assert hits == pytest.approx(round(hits))
    fast_args = ["--fast", "--n-last-blocks", 1, "--avgpool-patchtokens"]
    code, text = _run(
        ["linear", "--train", data["train"], "--test", data["test"], *fast_args, *common], capsys
    )
    assert code == 0, text
    fast = _results(out)
    assert fast["mode"] == "cached features" and fast["representation"] == "cls+mean"
    files = [
        "--train-features",
        cached["train"],
        "--test-features",
        cached["test"],
        "--representation",
        "cls+mean",
    ]
    code, text = _run(["linear", *files, *common], capsys)
    assert code == 0, text
    assert _results(out)["test"] == fast["test"]  # cached files give the fast mode's numbers exactly


def test_random_init_baseline_is_reproducible(data, cached, tmp_path, capsys):
    args = ["--random-init", "--arch", "vit_tiny", "--patch-size", 8, "--depth", 1, "--crop-size", 32, *CPU]
    for name in ("a.pt", "b.pt"):
        code, text = _run(["extract", data["birds"], "--out", tmp_path / name, *args], capsys)
        assert code == 0, text
    a, b = FeatureSet.load(tmp_path / "a.pt"), FeatureSet.load(tmp_path / "b.pt")
    assert a.meta["model"]["source"] == "random init"
    torch.testing.assert_close(a.features["cls"], b.features["cls"])
    assert not torch.allclose(a.features["cls"], FeatureSet.load(cached["birds"]).features["cls"])
    code, text = _run(["extract", data["birds"], "--out", tmp_path / "c.pt", "--init-seed", 1, *args], capsys)
    assert code == 0, text
    assert not torch.allclose(a.features["cls"], FeatureSet.load(tmp_path / "c.pt").features["cls"])


def test_errors_are_reported_before_work(data, tmp_path, capsys):
    code, text = _run(["knn", "--test", data["test"], "--weights", data["weights"]], capsys)
    assert code == 2 and "--train" in text
    code, text = _run(["knn", "--train", data["train"], "--test", data["test"]], capsys)
    assert code == 2 and "need a model" in text
    code, text = _run(
        ["knn", "--train", data["train"], "--test", tmp_path / "missing", "--weights", data["weights"]],
        capsys,
    )
    assert code == 2 and "does not exist" in text
    code, text = _run(
        ["extract", data["test"], "--weights", data["weights"], "--out", tmp_path / "x.csv"], capsys
    )
    assert code == 2 and ".pt or .npz" in text
    code, text = _run(
        [
            "linear",
            "--train",
            data["train"],
            "--test",
            data["test"],
            "--weights",
            data["weights"],
            "--n-last-blocks",
            4,
            *CPU,
        ],
        capsys,
    )
    assert code == 2 and "last 4 blocks" in text
    if not torch.cuda.is_available():
        code, text = _run(
            [
                "extract",
                data["test"],
                "--weights",
                data["weights"],
                "--out",
                tmp_path / "x.pt",
                "--device",
                "cuda",
            ],
            capsys,
        )
        assert code == 2 and "no CUDA" in text


def test_write_results_prints_a_table_and_writes_json(tmp_path, capsys):
    write_results(
        {"k=20": {"top1": 12.3456}, "source": "random init", "nan": float("nan")}, tmp_path / "r.json", "T"
    )
    text = capsys.readouterr().out
    assert "## T" in text and "| k=20.top1 | 12.35 |" in text and "| source    | random init |" in text
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "k=20": {"top1": 12.3456},
        "source": "random init",
        "nan": None,
    }


def test_device_and_image_defaults(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "data: {global_crop_size: 48, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n"
    )
    settings = training_image_settings(str(run))
    assert (
        settings.crop_size == 48 and settings.mean == (0.5, 0.5, 0.5) and settings.std == (0.25, 0.25, 0.25)
    )
    assert training_image_settings("torchvision:resnet50").crop_size is None


def test_extract_flat_folder_is_unlabelled(data, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted((data["test"] / "bird").iterdir()):
        shutil.copy(image, flat / image.name)
    code, text = _run(
        ["extract", flat, "--weights", data["weights"], "--out", tmp_path / "flat.pt", *CPU], capsys
    )
    assert code == 0, text
    fs = FeatureSet.load(tmp_path / "flat.pt")
    assert fs.classes == [] and fs.labels.tolist() == [-1, -1, -1] and not fs.labelled
    code, text = _run(
        [
            "knn",
            "--train",
            data["train"],
            "--test-features",
            tmp_path / "flat.pt",
            "--weights",
            data["weights"],
            *CPU,
        ],
        capsys,
    )
    assert code == 2 and "no labels" in text


def test_feature_extraction_precision_is_a_choice():
    """bf16 autocast on a GPU by default (fast); fp32 on request, as the original scripts compute."""
    from dino.cli import parse_args
    from dino.devices import autocast_dtype_for

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype_for(cuda) is torch.bfloat16 and autocast_dtype_for(cpu) is None
    assert autocast_dtype_for(cuda, "fp32") is None and autocast_dtype_for(cpu, "bf16") is torch.bfloat16
    required = {"extract": ["folder", "--out", "f.pt"], "knn": [], "linear": [], "lowshot": []}
    for command, args in required.items():
        assert parse_args([command, *args]).precision == "auto"
        assert parse_args([command, *args, "--precision", "fp32"]).precision == "fp32"


def test_evaluations_name_devices_as_training_does(capsys):
    """``--device`` takes what ``run.device`` takes (a GPU by index too) and refuses anything else at once."""
    from dino.cli import parse_args

    for name in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert parse_args(["knn", "--device", name]).device == name
        assert parse_args(["videoseg", "--data", "d", "--device", name]).device == name
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["knn", "--device", "tpu"])
    assert exit_info.value.code == 2
    assert "must be auto, cpu, mps, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


def test_knn_help_states_the_top5_rule(capsys):
    """A class without a vote is never a top-5 hit (the original script's full sort can count one by tie
    order): the help says so."""
    with pytest.raises(SystemExit):
        main(["knn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Top-5 counts only classes that got a vote: no vote, no hit" in text


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 2), (16, 4)])
def test_loader_workers_default_to_the_cpus_available_at_most_4(cpus, workers, monkeypatch):
    """On a 2-core machine 4 workers only compete for the cores (and PyTorch warns twice per command)."""
    from dino.cli import parse_args

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert parse_args(["knn", "--train", "a", "--test", "b", "--weights", "w"]).num_workers == workers
    assert parse_args(["retrieval", "--data", "d", "--weights", "w"]).num_workers == workers
    assert parse_args(["knn", "--train", "a", "--test", "b", "--num-workers", "3"]).num_workers == 3
