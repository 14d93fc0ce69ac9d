"""Fine-tuning: the recipe's pieces against hand computations, a few steps end to end, exact resume, the
timm export of the classifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dino.cli import main
from dino.config import ConfigError
from dino.devices import Precision
from dino.finetune.config import finetune_preset_names, load_finetune_config
from dino.finetune.data import SeededMixup, smoothed_targets
from dino.finetune.evaluate import evaluate_classifier
from dino.finetune.export import export_classifier
from dino.finetune.model import BackboneSpec, Classifier, build_classifier, layer_id, param_groups
from dino.finetune.trainer import FinetuneStep, FinetuneTrainer, build_optimizer, lr_schedule
from dino.hub import read_backbone_weights
from dino.models.backbones import build_backbone
from dino.models.vision_transformer import vit
from dino.train.distributed import DistEnv

TINY = [
    "data.img_size=32",
    "data.num_workers=0",
    "data.scale=[0.5,1.0]",
    "run.batch_size=8",
    "run.log_every=1",
    "run.progress_bar=never",
    "run.deterministic=true",
    "optim.warmup_epochs=0.5",
    "optim.lr=0.01",
]


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> Path:
    """A tiny ViT backbone (2 blocks, patch 8, 32 px) saved as our exports are: a plain state dict."""
    path = tmp_path_factory.mktemp("weights") / "vit.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(vit("tiny", 8, 32, 0.0, 2).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory, small_folder) -> Path:
    """Held-out images of the same 4 classes as ``small_folder`` (the sample's val split)."""
    from dino.data.sample import sample_dataset

    root = tmp_path_factory.mktemp("val")
    source = sample_dataset("val")
    for class_dir in sorted(p for p in small_folder.iterdir()):
        (root / class_dir.name).mkdir()
        for image in sorted((source / class_dir.name).iterdir())[:4]:
            shutil.copy(image, root / class_dir.name / image.name)
    return root


def _cfg(vit_file: Path, train: Path, val: Path, out: Path, *extra: str):
    return load_finetune_config(
        None,
        [
            f"model.weights={vit_file}",
            f"data.train={train}",
            f"data.val={val}",
            f"run.output_dir={out}",
            *TINY,
            *extra,
        ],
    )


def _env() -> DistEnv:
    return DistEnv(0, 1, 0, torch.device("cpu"))


def test_layer_decay_gives_each_block_its_rate():
    depth, decay = 3, 0.5
    backbone = vit("tiny", 8, 32, 0.0, depth)
    model = Classifier(backbone, backbone.embed_dim, 5)
    scale_of = {}
    for group in param_groups(model, weight_decay=0.05, layer_decay=decay):
        for name in group["names"]:
            scale_of[name] = group["lr_scale"]
    # By hand: embeddings are layer 0, block i is layer i + 1, the final norm and the head depth + 1.
    assert scale_of["backbone.cls_token"] == pytest.approx(decay**4)
    assert scale_of["backbone.pos_embed"] == pytest.approx(decay**4)
    assert scale_of["backbone.patch_embed.proj.weight"] == pytest.approx(decay**4)
    for i in range(depth):
        assert scale_of[f"backbone.blocks.{i}.attn.qkv.weight"] == pytest.approx(decay ** (depth - i))
        assert scale_of[f"backbone.blocks.{i}.norm1.bias"] == pytest.approx(decay ** (depth - i))
    assert scale_of["backbone.norm.weight"] == 1.0
    assert scale_of["head.weight"] == 1.0 and scale_of["head.bias"] == 1.0
    assert set(scale_of) == {name for name, _ in model.named_parameters()}
    # No weight decay on biases, norms, [CLS] and position embeddings; decay on the matrices.
    decays = {n: g["weight_decay"] for g in param_groups(model, 0.05, decay) for n in g["names"]}
    assert decays["backbone.pos_embed"] == 0.0 and decays["backbone.blocks.0.norm1.weight"] == 0.0
    assert decays["backbone.blocks.0.mlp.fc1.weight"] == 0.05 and decays["head.weight"] == 0.05


def test_layer_ids_of_a_resnet_follow_its_stages():
    assert layer_id("backbone.conv1.weight", 4) == 0
    assert layer_id("backbone.bn1.bias", 4) == 0
    assert layer_id("backbone.layer1.0.conv1.weight", 4) == 1
    assert layer_id("backbone.layer4.0.bn2.weight", 4) == 4
    assert layer_id("head.weight", 4) == 5
    backbone, dim = build_backbone("resnet10_w16_cifar")
    model = Classifier(backbone, dim, 3)
    scales = {n: g["lr_scale"] for g in param_groups(model, 0.05, 0.5) for n in g["names"]}
    assert scales["backbone.conv1.weight"] == pytest.approx(0.5**5)
    assert scales["backbone.layer3.0.conv1.weight"] == pytest.approx(0.5**2)


def test_step_sets_each_group_lr_from_the_schedule(vit_file, small_folder, val_folder, tmp_path):
    cfg = _cfg(vit_file, small_folder, val_folder, tmp_path, "optim.layer_decay=0.5")
    weights = read_backbone_weights(vit_file)
    model, _ = build_classifier(weights, 4, 32)
    optimizer = build_optimizer(cfg, model)
    schedule = lr_schedule(cfg, 6, 1)
    step = FinetuneStep(cfg, model, optimizer, schedule, 4, Precision("fp32", None), torch.device("cpu"))
    step.step(torch.randn(8, 3, 32, 32), torch.arange(8) % 4, iteration=2)
    # peak = 0.01 × 8 / 512; iteration 2 of the warm-up; each group at decay^(3 − layer).
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(schedule[2] * 0.5 ** (3 - group["layer"]))
    assert schedule.max() == pytest.approx(0.01 * 8 / 512)


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_sum_to_one_and_match_the_mixed_images(
    mixup_alpha, cutmix_alpha, tmp_path, vit_file, small_folder, val_folder
):
    cfg = _cfg(
        vit_file, small_folder, val_folder, tmp_path,
        f"mixup.mixup_alpha={mixup_alpha}", f"mixup.cutmix_alpha={cutmix_alpha}", "mixup.label_smoothing=0.1",
    )  # fmt: skip
    mix = SeededMixup(cfg, num_classes=4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    # Each image constant: the fraction of image i that is its own tells the mixing weight.
    images = labels.float()[:, None, None, None].expand(6, 3, 32, 32).clone() + 10.0
    mixed, targets = mix(images.clone(), labels, iteration=5)
    assert targets.shape == (6, 4)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    own, other = images[:, 0, 0, 0], images.flip(0)[:, 0, 0, 0]
    for i in range(6):
        if own[i] == other[i]:
            continue
        # Fraction of image i's own pixel value in the mixed image (Mixup: blend; CutMix: pasted area).
        lam = float(((mixed[i] - other[i]) / (own[i] - other[i])).mean())
        expected = lam * smoothed_targets(labels[i : i + 1], 4, 0.1) + (1 - lam) * smoothed_targets(
            labels.flip(0)[i : i + 1], 4, 0.1
        )
        torch.testing.assert_close(targets[i : i + 1], expected, atol=1e-5, rtol=0)
    # The same iteration mixes the same way (resume), another one differently.
    again, _ = mix(images.clone(), labels, iteration=5)
    torch.testing.assert_close(again, mixed)


def test_smoothed_targets_by_hand():
    t = smoothed_targets(torch.tensor([2]), 4, 0.1)
    torch.testing.assert_close(t, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))


def test_per_class_accuracy_by_hand():
    class Fixed(torch.nn.Module):  # predicts class 0 for every image
        def forward(self, x):
            return torch.tensor([[3.0, 2.0, 1.0]]).expand(x.shape[0], 3)

    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    batches = [(torch.zeros(3, 1), labels[:3], 0), (torch.zeros(3, 1), labels[3:], 0)]
    result = evaluate_classifier(Fixed(), batches, ["a", "b", "c"], torch.device("cpu"))
    assert result.top1 == pytest.approx(200 / 6)
    assert result.top5 == pytest.approx(100.0)  # 3 classes: all in the top 5
    assert result.per_class == {"a": 100.0, "b": 0.0, "c": 0.0}


def test_config_is_validated_before_any_work(vit_file, small_folder, val_folder, tmp_path):
    with pytest.raises(ConfigError, match="even batch size"):
        _cfg(vit_file, small_folder, val_folder, tmp_path, "run.batch_size=7")
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        _cfg(vit_file, small_folder, val_folder, tmp_path, "optim.layer_decay=1.5")
    with pytest.raises(ConfigError, match="data.val"):
        _cfg(vit_file, small_folder, tmp_path / "missing", tmp_path)
    with pytest.raises(ConfigError, match="mixup.mode"):
        _cfg(vit_file, small_folder, val_folder, tmp_path, "mixup.mode=sometimes")
    with pytest.raises(ConfigError, match="model.weights"):
        load_finetune_config(None, [f"data.train={small_folder}", f"data.val={val_folder}"])
    for name in finetune_preset_names():  # every preset is valid
        load_finetune_config(
            name, [f"model.weights={vit_file}", f"data.train={small_folder}", f"data.val={val_folder}"]
        )


@pytest.mark.slow
def test_finetune_command_trains_backbone_and_head_and_exports_to_timm(
    vit_file, small_folder, val_folder, tmp_path, capsys
):
    out = tmp_path / "run"
    train = tmp_path / "train"  # the small folder (48 images) and two files that cannot be decoded: skipped
    shutil.copytree(small_folder, train)
    for i, name in enumerate(sorted(p.name for p in small_folder.iterdir())[:2]):
        (train / name / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    args = ["finetune", "--weights", str(vit_file), "--train", str(train), "--val", str(val_folder)]
    assert main([*args, "--output", str(out), *TINY, "run.epochs=1", "run.batch_size=10"]) == 0
    start = torch.load(vit_file, weights_only=True)
    final = torch.load(out / "classifier.pth", weights_only=True)
    assert final["classes"] == sorted(p.name for p in small_folder.iterdir())
    changed = [k for k, v in start.items() if not torch.equal(v, final["model"][f"backbone.{k}"])]
    assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed
    report = json.loads((out / "eval.json").read_text())
    assert set(report["per_class_top1"]) == set(final["classes"]) and report["images"] == 16
    assert 0.0 <= report["top1"] <= report["top5"] <= 100.0
    assert (out / "curves.png").is_file()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records].count("eval") == 1
    assert [r["bad_files"] for r in records if r["type"] == "epoch"] == [2]  # 50 files, 5 batches of 10
    # The head moved from its initialisation (the same seed builds it again).
    fresh, _ = build_classifier(read_backbone_weights(vit_file), 4, 32, seed=0)
    assert not torch.equal(fresh.head.weight, final["model"]["head.weight"])
    # Export: strict into timm, the same logits.
    assert main(["export", str(out), "--format", "timm"]) == 0
    _same_logits_in_timm(out / "export" / "classifier_timm.pth", final)


def _same_logits_in_timm(path: Path, final: dict) -> None:
    import timm

    model, _ = build_classifier(BackboneSpec("vit_tiny", 8, 32, 2), 4, 32)
    model.load_state_dict(final["model"])
    timm_model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=4, patch_size=8, img_size=32, depth=2
    )
    timm_model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-4)


def test_export_refuses_small_image_stems(tmp_path):
    backbone, dim = build_backbone("resnet10_w16_cifar")
    model = Classifier(backbone, dim, 3)
    obj = {"kind": "classifier", "model": model.state_dict(), "classes": ["a", "b", "c"], "source": "x",
           "backbone": {"arch": "resnet10_w16_cifar", "patch_size": 0, "img_size": 32, "depth": 0}}  # fmt: skip
    torch.save(obj, tmp_path / "classifier.pth")
    with pytest.raises(ValueError, match="no timm ResNet builds"):
        export_classifier(tmp_path / "classifier.pth")


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(vit_file, small_folder, val_folder, tmp_path):
    extra = ["run.epochs=2", "run.checkpoint_every_iters=4", "run.keep_last=10", "model.drop_path_rate=0.1"]
    whole = _cfg(vit_file, small_folder, val_folder, tmp_path / "whole", *extra)
    FinetuneTrainer(whole, _env(), resume=False).fit()
    checkpoint = tmp_path / "whole" / "checkpoints" / "last-000000004.pth"
    assert torch.load(checkpoint, weights_only=True)["step_in_epoch"] == 4  # mid-epoch (6 steps an epoch)
    resumed = _cfg(vit_file, small_folder, val_folder, tmp_path / "resumed", *extra)
    FinetuneTrainer(resumed, _env(), resume=checkpoint).fit()
    a = torch.load(tmp_path / "whole" / "classifier.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "classifier.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_of_a_classifier_other_than_timm_is_refused(tmp_path, capsys):
    backbone = vit("tiny", 8, 32, 0.0, 1)
    model = Classifier(backbone, backbone.embed_dim, 2)
    obj = {"kind": "classifier", "model": model.state_dict(), "classes": ["a", "b"], "source": "x",
           "backbone": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1}}  # fmt: skip
    torch.save(obj, tmp_path / "classifier.pth")
    assert main(["export", str(tmp_path), "--format", "safetensors"]) == 2
    assert "--format timm" in capsys.readouterr().err


def test_output_inside_the_run_it_fine_tunes_is_refused(vit_file, small_folder, val_folder):
    cfg = _cfg(vit_file, small_folder, val_folder, vit_file.parent)
    with pytest.raises(ConfigError, match="directory of its own"):
        FinetuneTrainer(cfg, _env(), resume=False)


def test_a_fine_tuned_resnet_exports_to_timm_with_the_same_logits(tmp_path):
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = build_classifier(BackboneSpec("resnet18", 0, 224, 0), 3, 64)
    obj = {"kind": "classifier", "model": model.state_dict(), "classes": ["a", "b", "c"], "source": "x",
           "backbone": {"arch": "resnet18", "patch_size": 0, "img_size": 224, "depth": 0}}  # fmt: skip
    torch.save(obj, tmp_path / "classifier.pth")
    exported = export_classifier(tmp_path / "classifier.pth")
    assert (exported.timm_name, exported.num_classes) == ("resnet18", 3)
    timm_model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    timm_model.load_state_dict(torch.load(exported.path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_fine_tuning_run_writes_tensorboard_events(vit_file, small_folder, val_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["finetune", "--weights", str(vit_file), "--train", str(small_folder), "--val", str(val_folder)]
    assert (
        main(
            [*args, "--output", str(out), *TINY, "run.epochs=1", "run.batch_size=16", "log.tensorboard=true"]
        )
        == 0
    )
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    iters = [r for r in records if r["type"] == "iter"]
    assert "train/loss" in events.Tags()["scalars"] and iters
    assert [e.value for e in events.Scalars("train/loss")] == [
        pytest.approx(r["loss"], rel=1e-6) for r in iters
    ]
