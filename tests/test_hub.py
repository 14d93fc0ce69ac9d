"""dino.hub: released names and cache, every accepted format, strict loads with actionable errors, safety."""

from __future__ import annotations

import functools
import io
import os
import shlex
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino import hub
from dino.checkpoint import CheckpointManager, load_checkpoint
from dino.config import config_from_dict, config_to_dict, load_config
from dino.hub import WeightsError
from dino.loss import DINOLoss
from dino.models.backbones import build_backbone
from dino.models.vision_transformer import VisionTransformer
from dino.teacher import ema_update
from dino.train.setup import build_student_teacher, load_model_state_dict, model_state_dict

from .original_dino import original_run, save_as_numpy1

DIM, HEADS, DEPTH, PATCH, IMG = 192, 3, 2, 4, 16  # a ViT-tiny/4 with 2 blocks on 16 px inputs
OUT_DIM, HIDDEN, BOTTLENECK = 64, 32, 16


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Nothing here may touch the network, and the cache folder is a temporary one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a URL")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv(hub.ENV_HOME, str(tmp_path / "cache"))


def documented_vit_state(
    depth: int = DEPTH, dim: int = DIM, patch: int = PATCH, img: int = IMG, seed: int = 0
):
    """A released-format ViT state dict built from the key list of the guide (not from our model)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    n = (img // patch) ** 2 + 1
    state = {
        "cls_token": rand(1, 1, dim, scale=0.5),
        "pos_embed": rand(1, n, dim, scale=0.5),
        "patch_embed.proj.weight": rand(dim, 3, patch, patch),
        "patch_embed.proj.bias": rand(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state.update(
            {
                b + "norm1.weight": 1 + rand(dim),
                b + "norm1.bias": rand(dim),
                b + "attn.qkv.weight": rand(3 * dim, dim),
                b + "attn.qkv.bias": rand(3 * dim),
                b + "attn.proj.weight": rand(dim, dim),
                b + "attn.proj.bias": rand(dim),
                b + "norm2.weight": 1 + rand(dim),
                b + "norm2.bias": rand(dim),
                b + "mlp.fc1.weight": rand(4 * dim, dim),
                b + "mlp.fc1.bias": rand(4 * dim),
                b + "mlp.fc2.weight": rand(dim, 4 * dim),
                b + "mlp.fc2.bias": rand(dim),
            }
        )
    state["norm.weight"], state["norm.bias"] = 1 + rand(dim), rand(dim)
    return state


def reference_cls(state: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """The original ViT's [CLS] output written out by hand (explicit softmax attention, LN eps 1e-6)."""
    w = state["patch_embed.proj.weight"]
    t = F.conv2d(x, w, state["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([state["cls_token"].expand(len(x), -1, -1), t], dim=1) + state["pos_embed"]
    b, n, d = t.shape
    for i in range(depth):
        p = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(t, (d,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, d)
        t = t + F.linear(h, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(t, (d,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
            p["mlp.fc2.weight"],
            p["mlp.fc2.bias"],
        )
        t = t + h
    return F.layer_norm(t, (d,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 0]


def tiny_config(**extra: str):
    overrides = [
        "model.arch=vit_tiny",
        f"model.patch_size={PATCH}",
        f"model.depth={DEPTH}",
        f"head.out_dim={OUT_DIM}",
        f"head.hidden_dim={HIDDEN}",
        f"head.bottleneck_dim={BOTTLENECK}",
        f"data.global_crop_size={IMG}",
        "data.local_crop_size=8",
        "data.local_crops_number=2",
        "run.epochs=5",
        "optim.warmup_epochs=1",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@functools.cache
def released_full_checkpoint(new_style_weight_norm: bool = False) -> tuple[dict, dict, dict]:
    """A checkpoint made as the original main_dino.py makes it (numpy numbers in the optimiser's groups,
    ``module.`` on the student, ``weight_g`` / ``weight_v``, ``fp16_scaler``, ``args`` a Namespace) after
    4 epochs of 2 steps; returns it with the student's and the teacher's states in our key layout.

    Cached: callers must not modify what it returns."""
    run = original_run(
        epochs_done=4, momentum_teacher=0.995, warmup_teacher_temp=0.03, teacher_temp=0.05,
        warmup_teacher_temp_epochs=2, weight_decay=0.05, weight_decay_end=0.3, clip_grad=2.5,
        batch_size_per_gpu=12, epochs=7, lr=0.0007, warmup_epochs=2, min_lr=2e-6, drop_path_rate=0.05,
        global_crops_scale=(0.35, 1.0), local_crops_number=3, local_crops_scale=(0.06, 0.35), seed=3,
    )  # fmt: skip
    checkpoint = dict(run.checkpoint)
    s_state = {k.removeprefix("module."): v for k, v in checkpoint["student"].items()}
    t_state = dict(checkpoint["teacher"])
    if new_style_weight_norm:  # torch.nn.utils.parametrizations.weight_norm names, in the same order
        renames = {
            "module.head.last_layer.weight_g": "module.head.last_layer.parametrizations.weight.original0",
            "module.head.last_layer.weight_v": "module.head.last_layer.parametrizations.weight.original1",
        }
        checkpoint["student"] = {renames.get(k, k): v for k, v in checkpoint["student"].items()}
    return checkpoint, s_state, t_state


# --- released backbone files ---------------------------------------------------------------------------


def test_released_vit_file_built_from_documented_keys_loads_strictly_with_original_features(tmp_path):
    state = documented_vit_state()
    path = tmp_path / "released.pth"
    torch.save(state, path)
    loaded = hub.load(path)
    assert set(loaded.model.state_dict()) == set(state)
    assert (loaded.arch, loaded.patch_size, loaded.img_size, loaded.depth) == ("vit_tiny", PATCH, IMG, DEPTH)
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        ours = loaded.model(x)
    torch.testing.assert_close(ours, reference_cls(state, x, DEPTH, HEADS), rtol=1e-5, atol=1e-5)


def test_released_resnet_file_loads_strictly(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "rn.pth")
    loaded = hub.load(tmp_path / "rn.pth")
    assert loaded.arch == "resnet18" and loaded.embed_dim == 512 and loaded.patch_size == 0
    reference.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference(x))


def test_released_name_resolves_in_the_cache_folder_set_by_env_or_argument(tmp_path):
    state = documented_vit_state(depth=1, dim=384, patch=16, img=224)
    env_cache = Path(os.environ[hub.ENV_HOME])
    env_cache.mkdir(parents=True)
    torch.save(state, env_cache / "dino_deitsmall16_pretrain.pth")
    loaded = hub.load("dino_vits16")
    assert (loaded.arch, loaded.patch_size, loaded.img_size) == ("vit_small", 16, 224)
    assert "dino_vits16" in loaded.source
    assert torch.equal(loaded.model.state_dict()["pos_embed"], state["pos_embed"])
    # An explicit folder wins over the environment; a bare released file name is found there too.
    other = tmp_path / "other"
    other.mkdir()
    torch.save(state, other / "dino_deitsmall8_pretrain.pth")
    with pytest.raises(WeightsError, match="dino_deitsmall8_pretrain.pth"):
        hub.load("dino_vits8")
    with pytest.raises(WeightsError, match="vit_small/16 .* but the model is a vit_small/8"):
        hub.load("dino_vits8", weights_dir=other)  # the file's patch size contradicts the name
    assert hub.load("dino_deitsmall8_pretrain.pth", weights_dir=other).patch_size == 16


def test_missing_released_file_explains_where_to_put_it_without_touching_the_network():
    with pytest.raises(WeightsError) as err:
        hub.load("dino_vitb8")
    message = str(err.value)
    assert "dino_vitbase8_pretrain.pth" in message and os.environ[hub.ENV_HOME] in message
    assert "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth" in message
    assert "--download" in message
    with pytest.raises(WeightsError, match="neither an existing file"):
        hub.load("dino_vitz16")


def test_download_only_when_asked_writes_into_the_cache(monkeypatch, tmp_path):
    buffer = io.BytesIO()
    torch.save(documented_vit_state(depth=1, dim=384, patch=16, img=224), buffer)
    requested = []

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        requested.append(url)
        return Response(buffer.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(WeightsError):
        hub.load("dino_vits16")
    assert requested == []
    loaded = hub.load("dino_vits16", download=True)
    assert requested == [
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    ]
    assert (Path(os.environ[hub.ENV_HOME]) / "dino_deitsmall16_pretrain.pth").is_file()
    assert loaded.arch == "vit_small"
    hub.load("dino_vits16", download=True)  # cached now: no second request
    assert len(requested) == 1


def test_student_of_a_single_backbone_file_is_refused(tmp_path):
    """A released (or exported) backbone file holds one backbone, the teacher: there is no student to give."""
    torch.save(documented_vit_state(), tmp_path / "b.pth")
    assert hub.load(tmp_path / "b.pth").arch == "vit_tiny"  # the default, the teacher, still loads
    assert hub.load(tmp_path / "b.pth", which="teacher").arch == "vit_tiny"
    with pytest.raises(
        WeightsError, match="one backbone and no student.*is the teacher.*full training checkpoint"
    ):
        hub.load(tmp_path / "b.pth", which="student")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(documented_vit_state(), str(tmp_path / "b.safetensors"))
    with pytest.raises(WeightsError, match="no student"):
        hub.load(tmp_path / "b.safetensors", which="student")


# --- full checkpoints, ours and released ------------------------------------------------------------------


def test_released_full_checkpoint_gives_teacher_or_student_backbone(tmp_path):
    checkpoint, s_state, t_state = released_full_checkpoint()
    torch.save(checkpoint, tmp_path / "full.pth")
    teacher = hub.load(tmp_path / "full.pth")
    student = hub.load(tmp_path / "full.pth", which="student")
    for loaded, state in ((teacher, t_state), (student, s_state)):
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, state[f"backbone.{k}"]), k
    assert "teacher" in teacher.source and "student" in student.source


def test_released_full_checkpoint_converts_for_resuming_training(tmp_path):
    checkpoint, s_state, t_state = released_full_checkpoint(new_style_weight_norm=True)
    torch.save(checkpoint, tmp_path / "full.pth")
    converted = hub.load_training_checkpoint(tmp_path / "full.pth")

    assert converted["format"] == "dino-checkpoint" and converted["epoch"] == 4
    assert set(converted["student"]) == set(s_state) == set(converted["teacher"])
    assert all(torch.equal(converted["student"][k], s_state[k]) for k in s_state)
    assert all(torch.equal(converted["teacher"][k], t_state[k]) for k in t_state)
    assert torch.equal(converted["dino_loss"]["center"], checkpoint["dino_loss"]["center"])
    assert not {"optimizer", "rng", "iteration", "step_in_epoch"} & set(converted)

    cfg = config_from_dict(converted["config"])
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.depth) == ("vit_tiny", PATCH, DEPTH)
    assert (cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim, cfg.head.nlayers) == (
        OUT_DIM,
        HIDDEN,
        BOTTLENECK,
        3,
    )
    assert cfg.data.global_crop_size == IMG and cfg.data.path is None
    assert (cfg.teacher.momentum, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp) == (0.995, 0.05, 0.03)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.clip_grad, cfg.optim.weight_decay_end) == (
        0.0007,
        2e-6,
        2.5,
        0.3,
    )
    assert (cfg.run.epochs, cfg.run.batch_size, cfg.run.seed) == (7, 12, 3)
    assert cfg.data.global_crops_scale == [0.35, 1.0] and cfg.data.local_crops_number == 3
    assert cfg.model.drop_path_rate == 0.05 and cfg.loss.warmup_teacher_temp_epochs == 2

    # Resume: our models take the converted state strictly, and one DINO step trains from there.
    student, teacher = build_student_teacher(cfg, torch.device("cpu"))
    load_model_state_dict(student, converted["student"])
    load_model_state_dict(teacher, converted["teacher"])
    loss_fn = DINOLoss(cfg.head.out_dim)
    loss_fn.load_state_dict(converted["dino_loss"])
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    crops = [torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, IMG, IMG), torch.randn(2, 3, 8, 8)]
    before_teacher = teacher.backbone.cls_token.detach().clone()
    loss, _ = loss_fn(student(crops), teacher(crops[:2]).detach(), cfg.loss.teacher_temp)
    loss.backward()
    optimizer.step()
    ema_update(teacher, student, 0.9)
    assert torch.isfinite(loss)
    assert not torch.equal(student.backbone.cls_token, s_state["backbone.cls_token"])
    expected = 0.9 * before_teacher + 0.1 * student.backbone.cls_token.detach()
    torch.testing.assert_close(teacher.backbone.cls_token.detach(), expected)
    assert not torch.equal(loss_fn.center, checkpoint["dino_loss"]["center"])


@pytest.mark.parametrize("numpy_paths", ["numpy 2", "numpy 1"])
def test_the_originals_full_checkpoint_with_its_numpy_numbers_loads(tmp_path, numpy_paths):
    """main_dino.py puts numpy float64 values (its schedules) into the optimiser's lr / weight_decay and
    saves optimizer.state_dict(): weights-only loading must accept those numbers, pickled under numpy 2's
    module path or numpy 1's (the released files), for backbones and training checkpoints alike."""
    checkpoint, s_state, t_state = released_full_checkpoint()
    path = tmp_path / "full.pth"
    if numpy_paths == "numpy 1":
        save_as_numpy1(checkpoint, path)
    else:
        torch.save(checkpoint, path)
    with pytest.raises(Exception, match="numpy.*multiarray.scalar"):  # what plain weights-only loading says
        torch.load(path, weights_only=True)

    raw = hub.read_weights_file(path)
    groups = raw["optimizer"]["param_groups"]
    assert type(groups[0]["lr"]) is np.float64 and type(groups[0]["weight_decay"]) is np.float64
    assert groups[0]["lr"] == checkpoint["optimizer"]["param_groups"][0]["lr"]
    assert raw["fp16_scaler"] == checkpoint["fp16_scaler"] and raw["args"] == checkpoint["args"]
    for which, state in (("teacher", t_state), ("student", s_state)):
        loaded = hub.load(path, which=which)
        assert all(torch.equal(v, state[f"backbone.{k}"]) for k, v in loaded.model.state_dict().items())
    converted = hub.load_training_checkpoint(path)
    assert converted["epoch"] == 4 and set(converted["released_optimizer"]["state"]) <= set(s_state)


def test_the_originals_full_checkpoint_evaluates_as_its_teacher(small_folder, tmp_path, capsys):
    """`dino extract --weights` on the original's full checkpoint (numpy 1 paths) gives the features of its
    teacher backbone saved alone, not those of its student."""
    from dino.cli import main
    from dino.eval.features import FeatureSet

    run = original_run(img=32, patch_size=8, depth=1, out_dim=32, niter_per_ep=1, epochs_done=1)
    save_as_numpy1(run.checkpoint, tmp_path / "full.pth")
    for which in ("teacher", "student"):
        prefix = "backbone." if which == "teacher" else "module.backbone."
        alone = {k.removeprefix(prefix): v for k, v in run.checkpoint[which].items() if k.startswith(prefix)}
        torch.save(alone, tmp_path / f"{which}.pth")
    features = {}
    for weights in ("full.pth", "teacher.pth", "student.pth"):
        out = tmp_path / f"{weights}.pt"
        args = ["extract", small_folder, "--weights", tmp_path / weights, "--out", out,
                "--device", "cpu", "--num-workers", "0", "--precision", "fp32"]  # fmt: skip
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
        features[weights] = FeatureSet.load(out).features["cls"]
    assert torch.equal(features["full.pth"], features["teacher.pth"])
    assert not torch.allclose(features["full.pth"], features["student.pth"])


def test_numpy_values_other_than_plain_numbers_are_still_refused(tmp_path):
    """The numpy allowance covers numbers only: arrays and object dtypes (which can hold any object) are
    refused like any other object, and so is a payload next to numpy numbers."""
    marker = tmp_path / "pwned"
    checkpoint, _, _ = released_full_checkpoint()
    cases = {
        "array.pth": {"a": np.arange(3.0)},
        "object_dtype.pth": {"d": np.dtype(object)},
        "payload.pth": {**checkpoint, "extra": Payload(marker)},
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(WeightsError, match="refused to load"):
            hub.read_weights_file(tmp_path / name)
    assert not marker.exists()


def test_training_checkpoint_of_ours_comes_back_as_load_checkpoint_returns_it(tmp_path):
    cfg = tiny_config()
    student, teacher = build_student_teacher(cfg, torch.device("cpu"))
    state = {
        "student": model_state_dict(student),
        "teacher": model_state_dict(teacher),
        "dino_loss": {"center": torch.zeros(1, OUT_DIM)},
        "epoch": 2,
        "iteration": 6,
        "step_in_epoch": 0,
        "config": config_to_dict(cfg),
    }
    path = CheckpointManager(tmp_path / "run").save(state, iteration=6)
    expected = load_checkpoint(path)
    for got in (hub.load_training_checkpoint(path), hub.load_training_checkpoint(tmp_path / "run")):
        assert set(got) == set(expected)
        assert got["config"] == expected["config"] and got["epoch"] == 2
        assert all(torch.equal(got["teacher"][k], v) for k, v in expected["teacher"].items())
    # Our checkpoint's config also defines the architecture when loading its backbone.
    loaded = hub.load(tmp_path / "run")
    assert (loaded.arch, loaded.patch_size, loaded.depth, loaded.img_size) == ("vit_tiny", PATCH, DEPTH, IMG)


def test_backbone_only_file_is_not_a_training_checkpoint(tmp_path):
    torch.save(documented_vit_state(), tmp_path / "b.pth")
    with pytest.raises(WeightsError, match="model.pretrained="):
        hub.load_training_checkpoint(tmp_path / "b.pth")


def test_pretrained_backbone_starts_training_with_a_fresh_head(tmp_path):
    checkpoint, _, t_state = released_full_checkpoint()
    torch.save(checkpoint, tmp_path / "full.pth")
    torch.save(documented_vit_state(), tmp_path / "released.pth")
    for source in ("full.pth", "released.pth"):
        cfg = tiny_config(**{"model.pretrained": str(tmp_path / source)})
        student, teacher = build_student_teacher(cfg, torch.device("cpu"))
        expected = (
            t_state["backbone.pos_embed"] if source == "full.pth" else documented_vit_state()["pos_embed"]
        )
        assert torch.equal(student.backbone.pos_embed, expected)
        assert torch.equal(teacher.backbone.pos_embed, expected)


def test_load_backbone_weights_resamples_position_embeddings_to_the_model_size(tmp_path):
    state = documented_vit_state()
    torch.save(state, tmp_path / "b.pth")
    bigger = VisionTransformer(
        img_size=2 * IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS
    )
    hub.load_backbone_weights(bigger, tmp_path / "b.pth")
    native = hub.load(tmp_path / "b.pth").model
    x = torch.randn(2, 3, 2 * IMG, 2 * IMG)
    with torch.no_grad():
        assert torch.equal(bigger.eval()(x), native(x))


def test_img_size_resamples_position_embeddings_bicubically(tmp_path):
    state = documented_vit_state()
    torch.save(state, tmp_path / "b.pth")
    native = hub.load(tmp_path / "b.pth")
    resized = hub.load(tmp_path / "b.pth", img_size=2 * IMG)
    assert resized.img_size == 2 * IMG
    assert resized.model.pos_embed.shape == (1, (2 * IMG // PATCH) ** 2 + 1, DIM)
    # The original's resampling written out: bicubic on the 4x4 grid with scale factor (8 + 0.1) / 4 (its
    # guard against rounding down), class position kept.
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, scale_factor=8.1 / 4, mode="bicubic", align_corners=False)
    direct = direct.permute(0, 2, 3, 1)
    torch.testing.assert_close(resized.model.pos_embed[:, 1:], direct.reshape(1, 64, DIM))
    assert torch.equal(resized.model.pos_embed[:, :1], state["pos_embed"][:, :1])
    x = torch.randn(2, 3, 2 * IMG, 2 * IMG)
    with torch.no_grad():  # the model resamples on the fly identically
        assert torch.equal(resized.model(x), native.model(x))
    with pytest.raises(WeightsError, match="multiple of the patch size"):
        hub.load(tmp_path / "b.pth", img_size=IMG + 1)


def test_run_that_kept_only_the_teacher_backbone_says_the_student_needs_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(documented_vit_state(), run / "teacher_backbone.pth")
    assert hub.load(run).arch == "vit_tiny"
    with pytest.raises(WeightsError) as err:
        hub.load(run, which="student")
    message = str(err.value)
    assert "kept only the teacher backbone" in message and "checkpoints/" in message
    assert "no teacher_backbone.pth" not in message
    with pytest.raises(WeightsError, match="no checkpoints/ and no teacher_backbone.pth"):
        hub.load(tmp_path, which="student")  # a folder that is no run at all


def test_img_size_is_refused_for_resnets(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "rn.pth")
    with pytest.raises(WeightsError, match="img_size .*only .*ViT position embeddings.*resnet18"):
        hub.load(tmp_path / "rn.pth", img_size=999)
    assert hub.load(tmp_path / "rn.pth").img_size == 224


# --- actionable errors ------------------------------------------------------------------------------------


def test_wrong_architecture_names_keys_and_cause(tmp_path):
    torch.save(documented_vit_state(), tmp_path / "tiny4.pth")
    with pytest.raises(WeightsError) as err:
        hub.load(tmp_path / "tiny4.pth", patch_size=8)
    message = str(err.value)
    assert "patch_embed.proj.weight: file (192, 3, 4, 4) vs model (192, 3, 8, 8)" in message
    assert "vit_tiny/4" in message and "vit_tiny/8" in message
    with pytest.raises(WeightsError, match="vit_tiny/4 .* but the model is a vit_small/4"):
        hub.load(tmp_path / "tiny4.pth", arch="vit_small")


def test_full_checkpoint_as_backbone_and_student_get_their_hints(tmp_path):
    checkpoint, _, t_state = released_full_checkpoint()
    model, _ = build_backbone("vit_tiny", PATCH, IMG, 0.0, DEPTH)
    with pytest.raises(WeightsError) as err:
        hub.load_strict(model, checkpoint["student"], "full.pth", which="student")
    message = str(err.value)
    assert "missing cls_token" in message and "unexpected module.backbone.cls_token" in message
    assert "full training checkpoint" in message and "picked the student" in message


def test_position_embedding_grid_mismatch_suggests_img_size():
    model, _ = build_backbone("vit_tiny", PATCH, 2 * IMG, 0.0, DEPTH)
    with pytest.raises(WeightsError, match="pos_embed: file .* img_size="):
        hub.load_strict(model, documented_vit_state(), "b.pth")


def no_class_token_position_state() -> dict[str, torch.Tensor]:
    """A ViT state whose position embeddings have no class-token slot (timm's ``no_embed_class=True``)."""
    state = documented_vit_state()
    state["pos_embed"] = state["pos_embed"][:, 1:].clone()  # 4 x 4 patch positions only
    return state


def test_position_embeddings_without_a_class_slot_or_on_a_non_square_grid_are_refused(tmp_path):
    """Resampling needs a class-token position plus a square grid; other layouts are refused up front,
    never answered with a hint to pass img_size (which could not work)."""
    torch.save(no_class_token_position_state(), tmp_path / "no_cls.pth")
    for kwargs in ({}, {"img_size": IMG}, {"img_size": 2 * IMG}, {"arch": "vit_tiny"}):
        with pytest.raises(WeightsError) as err:
            hub.load(tmp_path / "no_cls.pth", **kwargs)
        message = str(err.value)
        assert "no class-token" in message and "not supported" in message, kwargs
        assert "img_size=" not in message
    non_square = documented_vit_state()
    non_square["pos_embed"] = torch.randn(1, 1 + 3 * 4, DIM)  # class token + a 3 x 4 grid
    torch.save(non_square, tmp_path / "3x4.pth")
    with pytest.raises(WeightsError, match="not a square.*not supported"):
        hub.load(tmp_path / "3x4.pth", img_size=IMG)
    model, _ = build_backbone("vit_tiny", PATCH, IMG, 0.0, DEPTH)
    with pytest.raises(WeightsError) as err:
        hub.load_strict(model, no_class_token_position_state(), "no_cls.pth")
    assert "no class-token" in str(err.value) and "img_size=" not in str(err.value)


def test_timm_vit_without_class_token_position_is_refused_with_the_reason(tmp_path):
    timm = pytest.importorskip("timm")
    for extra in ({"no_embed_class": True, "img_size": IMG}, {"img_size": (12, IMG)}):
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=0, patch_size=PATCH, depth=1, **extra
        )
        torch.save(model.state_dict(), tmp_path / "timm.pth")
        with pytest.raises(WeightsError, match="not supported"):
            hub.load(tmp_path / "timm.pth", img_size=IMG)


def test_non_weights_content_is_refused_with_a_reason(tmp_path):
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="no state dict of tensors"):
        hub.load(tmp_path / "x.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read"):
        hub.load(tmp_path / "junk.pth")


# --- safety ---------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    state = documented_vit_state()
    torch.save({**state, "extra": Payload(marker)}, tmp_path / "evil_backbone.pth")
    checkpoint, _, _ = released_full_checkpoint()
    torch.save({**checkpoint, "args": Payload(marker)}, tmp_path / "evil_full.pth")

    # The payload is live: an unsafe load would run it.
    torch.load(tmp_path / "evil_backbone.pth", weights_only=False)
    assert marker.exists()
    marker.unlink()

    model, _ = build_backbone("vit_tiny", PATCH, IMG, 0.0, DEPTH)
    attempts = [
        lambda: hub.load(tmp_path / "evil_backbone.pth"),
        lambda: hub.load(tmp_path / "evil_full.pth"),
        lambda: hub.load_training_checkpoint(tmp_path / "evil_full.pth"),
        lambda: hub.load_backbone_weights(model, tmp_path / "evil_backbone.pth"),
    ]
    for attempt in attempts:
        with pytest.raises(WeightsError, match="refused to load .*system"):
            attempt()
        assert not marker.exists()


# --- timm and safetensors inputs ------------------------------------------------------------------------


def test_timm_vit_state_dict_with_classifier_loads_as_backbone(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, patch_size=PATCH, img_size=IMG, depth=DEPTH
    ).eval()
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    loaded = hub.load(tmp_path / "timm.pth")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(x), model.forward_head(model.forward_features(x), pre_logits=True)
        )


def test_timm_vit_with_average_pooling_is_refused_with_the_reason(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        global_pool="avg",
        patch_size=PATCH,
        img_size=IMG,
        depth=1,
    )
    torch.save(model.state_dict(), tmp_path / "avg.pth")
    with pytest.raises(WeightsError, match="unexpected fc_norm.bias.*timm ViT variant"):
        hub.load(tmp_path / "avg.pth")


def test_plain_safetensors_file_infers_the_architecture(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = documented_vit_state()
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    loaded = hub.load(tmp_path / "model.safetensors")
    assert (loaded.arch, loaded.patch_size, loaded.depth) == ("vit_tiny", PATCH, DEPTH)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
