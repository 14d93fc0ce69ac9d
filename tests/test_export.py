"""dino.hub.export: round trips for every format, the released layout, safetensors metadata, timm, the command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dino import hub
from dino.checkpoint import CheckpointManager
from dino.cli import main
from dino.config import config_to_dict, load_config
from dino.hub import WeightsError
from dino.hub.export import EXPORT_FORMATS, export_backbone, safetensors_metadata, timm_model_args
from dino.models.vision_transformer import VisionTransformer
from dino.train.setup import build_student_teacher, model_state_dict

PATCH, IMG, DEPTH = 4, 16, 2
RELEASED_VIT_KEYS = [
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
]
BLOCK_KEYS = [
    f"{layer}.{p}"
    for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias")
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding one of our checkpoints (tiny ViT), teacher different from student."""
    cfg = load_config(
        None,
        [
            "model.arch=vit_tiny",
            f"model.patch_size={PATCH}",
            f"model.depth={DEPTH}",
            "head.out_dim=32",
            "head.hidden_dim=16",
            "head.bottleneck_dim=8",
            f"data.global_crop_size={IMG}",
            "data.local_crop_size=8",
        ],
    )
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg, torch.device("cpu"))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path_factory.mktemp("run")
    state = {
        "student": model_state_dict(student),
        "teacher": model_state_dict(teacher),
        "dino_loss": {"center": torch.zeros(1, 32)},
        "epoch": 1,
        "iteration": 2,
        "step_in_epoch": 0,
        "config": config_to_dict(cfg),
    }
    CheckpointManager(run).save(state, iteration=2)
    return run


@pytest.fixture(scope="module")
def run_features(run_dir) -> dict[str, torch.Tensor]:
    """Features of the run's teacher and student backbones on a fixed input."""
    return {which: features(hub.load(run_dir, which=which).model) for which in ("teacher", "student")}


def features(model: torch.nn.Module, size: int = IMG) -> torch.Tensor:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_then_load_gives_bit_identical_outputs(run_dir, run_features, tmp_path, fmt, which):
    exported = export_backbone(run_dir, fmt, tmp_path / f"out-{fmt}", which=which)
    loaded = hub.load(exported.path)
    assert (loaded.arch, loaded.patch_size, loaded.img_size, loaded.depth) == ("vit_tiny", PATCH, IMG, DEPTH)
    out = features(loaded.model)
    assert torch.equal(out, run_features[which])
    assert not torch.equal(out, run_features["student" if which == "teacher" else "teacher"])


def test_dino_format_is_a_plain_state_dict_in_the_released_layout(run_dir, tmp_path):
    exported = export_backbone(run_dir, "dino", tmp_path / "b.pth")
    state = torch.load(exported.path, weights_only=True)
    expected = set(RELEASED_VIT_KEYS) | {f"blocks.{i}.{k}" for i in range(DEPTH) for k in BLOCK_KEYS}
    assert set(state) == expected and all(isinstance(v, torch.Tensor) for v in state.values())
    # The key layout and shapes of the original vision_transformer.VisionTransformer (eps 1e-6, qkv bias).
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=192, depth=DEPTH, num_heads=3)
    model.load_state_dict(state, strict=True)
    assert "VisionTransformer(patch_size=4, embed_dim=192, depth=2, num_heads=3" in exported.load_hint
    assert "img_size=[16]" in exported.load_hint and "--img-size 224" in exported.load_hint


def test_safetensors_metadata_records_the_architecture(run_dir, tmp_path):
    from safetensors import safe_open

    exported = export_backbone(run_dir, "safetensors", tmp_path / "b.safetensors", which="student")
    with safe_open(str(exported.path), framework="pt") as fh:
        metadata = fh.metadata()
    assert metadata == safetensors_metadata(exported.weights)
    assert {
        k: metadata[k]
        for k in ("format", "format_version", "arch", "patch_size", "img_size", "depth", "embed_dim")
    } == {
        "format": "dino-backbone",
        "format_version": "1",
        "arch": "vit_tiny",
        "patch_size": "4",
        "img_size": "16",
        "depth": "2",
        "embed_dim": "192",
    }
    assert metadata["which"] == "student"


def test_timm_export_loads_strictly_into_timm_with_the_same_outputs(run_dir, tmp_path):
    timm = pytest.importorskip("timm")
    exported = export_backbone(run_dir, "timm", tmp_path / "t.pth")
    name, kwargs = timm_model_args(exported.weights)
    assert (name, kwargs) == (
        "vit_tiny_patch16_224",
        {"num_classes": 0, "patch_size": 4, "img_size": 16, "depth": 2},
    )
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(torch.load(exported.path, weights_only=True), strict=True)
    # timm embeds patches with a convolution, ours with the same weights as one matrix product
    torch.testing.assert_close(features(model), features(hub.load(run_dir).model), rtol=1e-5, atol=1e-5)
    assert f"timm.create_model('{name}', pretrained=False, num_classes=0" in exported.load_hint


def test_timm_names_for_the_released_architectures():
    def args(arch: str, patch: int, img: int = 224, depth: int = 12) -> tuple:
        return timm_model_args(hub.BackboneWeights({}, arch, patch, img, depth, "test"))

    # timm's own names for the released DINO models (their configuration has no classifier)
    assert args("vit_small", 16) == ("vit_small_patch16_224.dino", {})
    assert args("vit_small", 8) == ("vit_small_patch8_224.dino", {})
    assert args("vit_base", 16) == ("vit_base_patch16_224.dino", {})
    assert args("vit_base", 8, img=480) == ("vit_base_patch8_224.dino", {"img_size": 480})
    assert args("vit_small", 16, depth=6) == ("vit_small_patch16_224", {"num_classes": 0, "depth": 6})
    assert args("resnet50", 0, depth=0) == ("resnet50", {"num_classes": 0})


@pytest.mark.slow
# ViT-B builds take 25 s here under load: the two ViT-S shapes run, the ViT-B names are checked above
@pytest.mark.parametrize(("arch", "patch"), [("vit_small", 16), ("vit_small", 8)])
def test_exports_of_the_released_shapes_load_into_timms_dino_models_by_name(arch, patch, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = hub.build_untrained(arch, patch).model
    torch.save(ours.state_dict(), tmp_path / "backbone.pth")
    exported = export_backbone(tmp_path / "backbone.pth", "timm", tmp_path / "t.pth")
    name = f"{arch}_patch{patch}_224.dino"  # as timm lists them: timm.list_pretrained("*.dino")
    assert name in timm.list_pretrained(name)
    model = timm.create_model(name, pretrained=False)  # no download; no classifier by its configuration
    model.load_state_dict(torch.load(exported.path, weights_only=True), strict=True)
    assert f"timm.create_model({name!r}, pretrained=False).load_state_dict(" in exported.load_hint
    if (arch, patch) == (
        "vit_small",
        16,
    ):  # the same features (the others: the same tensors, loaded strictly)
        images = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(images), ours(images), rtol=1e-5, atol=1e-5)


def test_resnet_exports_load_into_torchvision_and_timm(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None).eval()
    torch.save(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}, tmp_path / "rn.pth"
    )
    reference.fc = torch.nn.Identity()
    x_out = features(reference, 32)
    dino_file = export_backbone(tmp_path / "rn.pth", "dino", tmp_path / "rn_dino.pth")
    reference.load_state_dict(torch.load(dino_file.path, weights_only=True), strict=True)
    assert torch.equal(features(reference, 32), x_out)
    assert torch.equal(
        features(hub.load(export_backbone(tmp_path / "rn.pth", "safetensors").path).model, 32), x_out
    )
    timm = pytest.importorskip("timm")
    timm_file = export_backbone(tmp_path / "rn.pth", "timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(timm_file.path, weights_only=True), strict=True)
    assert torch.equal(features(model, 32), x_out)


def test_small_stem_resnet_round_trips_and_its_load_hint_builds_it(tmp_path):
    import torchvision

    from dino.models.backbones import build_backbone

    model, dim = build_backbone("resnet18_cifar")
    assert dim == 512 and model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, torch.nn.Identity)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "rn.pth")
    x_out = features(model, 16)
    loaded = hub.load(tmp_path / "rn.pth")  # the stem is told apart by its 3×3 first convolution
    assert loaded.arch == "resnet18_cifar" and torch.equal(features(loaded.model, 16), x_out)
    safetensors = export_backbone(tmp_path / "rn.pth", "safetensors")
    from_safetensors = hub.load(safetensors.path)
    assert torch.equal(features(from_safetensors.model, 16), x_out)
    # Evaluations default to the 32 px images such a network is trained on, not 224.
    from dino.cli.arguments import default_crop_size

    assert default_crop_size(loaded) == default_crop_size(from_safetensors) == 32
    assert default_crop_size(hub.build_untrained("resnet18_cifar", 16, 0)) == 32
    assert default_crop_size(hub.build_untrained("resnet18", 16, 0)) == 224
    exported = export_backbone(tmp_path / "rn.pth", "dino", tmp_path / "rn_dino.pth")
    m = torchvision.models.resnet18()
    exec(exported.load_hint.replace(f"torch.load({str(exported.path)!r})", "state"),  # the printed recipe
         {"torchvision": torchvision, "torch": torch, "m": m, "state": torch.load(exported.path)})  # fmt: skip
    with pytest.raises(WeightsError, match="no timm ResNet builds"):
        export_backbone(tmp_path / "rn.pth", "timm")
    assert not list(tmp_path.glob("*timm*"))


def test_export_resamples_to_another_input_size(run_dir, tmp_path):
    exported = export_backbone(run_dir, "safetensors", tmp_path / "big.safetensors", img_size=32)
    loaded = hub.load(exported.path)
    assert loaded.img_size == 32 and loaded.model.pos_embed.shape[1] == (32 // PATCH) ** 2 + 1
    assert torch.equal(
        features(loaded.model, 32), features(hub.load(run_dir).model, 32)
    )  # resampled on the fly


def test_export_refuses_to_overwrite_without_force_and_writes_by_default_into_the_run(run_dir):
    first = export_backbone(run_dir, "dino")
    assert first.path == run_dir / "export" / "teacher_backbone.pth"
    with pytest.raises(WeightsError, match="--force"):
        export_backbone(run_dir, "dino")
    assert export_backbone(run_dir, "dino", overwrite=True).path == first.path


def test_export_into_an_existing_directory_writes_the_default_name_there(run_dir, tmp_path, capsys):
    source = export_backbone(run_dir, "dino", tmp_path / "b.pth").path
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    expected = outdir / "b_teacher.safetensors"
    for force in ([], ["--force"]):  # the folder exists either way; the file inside it is what --force is for
        assert main(["export", str(source), "--format", "safetensors", "-o", str(outdir), *force]) == 0
        assert f"wrote {expected}" in capsys.readouterr().out
        assert expected.is_file() and torch.equal(
            features(hub.load(expected).model), features(hub.load(source).model)
        )
    assert main(["export", str(source), "--format", "safetensors", "-o", str(outdir)]) == 2
    assert f"{expected} exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(run_dir), "-o", str(outdir)]) == 0  # a run: <which>_backbone<suffix>
    assert (outdir / "teacher_backbone.pth").is_file()
    assert sorted(p.name for p in outdir.iterdir()) == ["b_teacher.safetensors", "teacher_backbone.pth"]


def test_student_of_a_backbone_only_file_is_refused(run_dir, run_features, tmp_path, capsys):
    """A backbone file (released, or exported) holds the teacher; asking for the student is an error, not
    the teacher labelled as student. Full checkpoints and runs, and student exports, still give it."""
    backbone = export_backbone(run_dir, "dino", tmp_path / "b.pth").path
    with pytest.raises(WeightsError, match="one backbone .*no student"):
        export_backbone(backbone, "safetensors", which="student")
    assert main(["export", str(backbone), "--which", "student"]) == 2
    assert "--which student" in capsys.readouterr().err
    assert not list(tmp_path.glob("b_student*"))
    assert export_backbone(backbone, "safetensors").weights.which is None  # teacher, the default, works
    student = export_backbone(run_dir, "safetensors", tmp_path / "s.safetensors", which="student")
    assert student.weights.which == "student"
    again = export_backbone(student.path, "safetensors", tmp_path / "s2.safetensors", which="student")
    assert torch.equal(features(hub.load(again.path).model), run_features["student"])
    with pytest.raises(WeightsError, match="no student"):  # a plain .pth carries no label: refused
        export_backbone(export_backbone(run_dir, "dino", tmp_path / "s.pth", which="student").path,
                        "dino", which="student")  # fmt: skip


def test_img_size_is_refused_for_resnets(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "rn.pth")
    with pytest.raises(WeightsError, match="only .*ViT position embeddings"):
        export_backbone(tmp_path / "rn.pth", "safetensors", img_size=999)
    assert not list(tmp_path.glob("*.safetensors"))


def test_export_of_a_malicious_file_is_refused(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"cls_token": torch.zeros(1), "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused"):
        export_backbone(tmp_path / "evil.pth", "safetensors")
    assert not (tmp_path / "pwned").exists()


def test_export_command(run_dir, run_features, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert (
        main(["export", str(run_dir), "--format", "safetensors", "--which", "student", "--output", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "vit_tiny/4" in printed and "student" in printed
    assert torch.equal(features(hub.load(out).model), run_features["student"])
    assert main(["export", str(run_dir), "--format", "safetensors", "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", "dino_vits16", "--weights-dir", str(tmp_path / "empty")]) == 2
    assert "--download" in capsys.readouterr().err


def test_safetensors_from_a_newer_format_version_is_refused(run_dir, tmp_path):
    from safetensors.torch import save_file

    exported = export_backbone(run_dir, "safetensors", tmp_path / "b.safetensors")
    newer = {**safetensors_metadata(exported.weights), "format_version": "99"}
    save_file(exported.weights.state, str(tmp_path / "newer.safetensors"), metadata=newer)
    with pytest.raises(WeightsError, match="newer dino"):
        hub.load(tmp_path / "newer.safetensors")


def test_safetensors_and_pth_exports_get_the_permissions_of_a_normal_file(run_dir, tmp_path):
    """0666 less the umask, for both formats (safetensors' own writer made 0600 files)."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        modes = {
            fmt: stat.S_IMODE(export_backbone(run_dir, fmt, tmp_path / f"b-{fmt}").path.stat().st_mode)
            for fmt in ("dino", "safetensors")
        }
    finally:
        os.umask(old)
    assert modes == {"dino": 0o640, "safetensors": 0o640}


def test_the_safetensors_load_hint_gives_a_module(run_dir, run_features, tmp_path):
    """The printed hint is code: run as written it gives the backbone itself, not the LoadedBackbone."""
    exported = export_backbone(run_dir, "safetensors", tmp_path / "b.safetensors")
    namespace: dict = {}
    exec("import dino.hub", namespace)
    model = eval(exported.load_hint.split("  #")[0], namespace)
    assert isinstance(model, torch.nn.Module)
    assert torch.equal(features(model), run_features["teacher"])
    assert "LoadedBackbone" in exported.load_hint


@pytest.mark.parametrize("arch", ["resnet10_cifar", "resnet10_w32_cifar"])
def test_narrow_small_image_resnets_export_and_their_load_hint_builds_them(tmp_path, arch):
    from dino.models.backbones import build_backbone

    model, _ = build_backbone(arch)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "rn.pth")
    exported = export_backbone(tmp_path / "rn.pth", "dino", tmp_path / "out.pth")
    assert exported.weights.arch == arch
    scope = {"torch": torch, "dino": __import__("dino.hub")}
    exec(f"m = {exported.load_hint}" if exported.load_hint.startswith("dino.") else exported.load_hint, scope)
    assert torch.equal(features(scope["m"].eval(), 16), features(model, 16))
    with pytest.raises(WeightsError, match="no timm ResNet builds"):
        export_backbone(tmp_path / "rn.pth", "timm")


def test_vit_giant_is_recognised_exported_for_the_original_code_and_refused_for_timm(tmp_path):
    """ViT-g/14's dimensions read back from a file's shapes; its plain-MLP layout has no timm counterpart."""
    from dino.hub.state import infer_architecture
    from dino.models.vision_transformer import vit

    state = vit("giant", 14, img_size=28, depth=1).state_dict()
    assert infer_architecture(state) == ("vit_giant", 14, 28, 1)
    torch.save(state, tmp_path / "giant.pth")
    exported = export_backbone(tmp_path / "giant.pth", "dino", output=tmp_path / "out.pth")
    assert "embed_dim=1536, depth=1, num_heads=24" in exported.load_hint
    with pytest.raises(WeightsError, match="export it as pth or safetensors"):
        export_backbone(tmp_path / "giant.pth", "timm", output=tmp_path / "out_timm.pth")
