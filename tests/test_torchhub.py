"""torch.hub entries from a clone (offline), their download path, and dino.load's one-line load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import dino
from dino.hub import WeightsError, build_untrained
from dino.hub.torchhub import HUB_ENTRIES
from dino.models.vision_transformer import VisionTransformer

REPO = Path(__file__).resolve().parents[1]  # the clone: hubconf.py at its root


def test_the_original_entry_names_are_listed():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    assert spec is not None and spec.loader is not None
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    listed = {name for name, f in vars(hubconf).items() if callable(f) and not name.startswith("_")}
    original = {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_resnet50",
                "dino_xcit_small_12_p16", "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16",
                "dino_xcit_medium_24_p8"}  # fmt: skip
    assert original <= listed and set(HUB_ENTRIES) == original


@pytest.mark.parametrize(
    ("entry", "arch", "patch", "dim"),
    [("dino_vits16", "vit_small", 16, 384), ("dino_resnet50", "resnet50", 0, 2048)],
)
def test_an_entry_loads_offline_from_a_clone(entry, arch, patch, dim):
    model = torch.hub.load(str(REPO), entry, source="local", pretrained=False)
    assert not model.training
    assert (model.arch, model.patch_size, model.embed_dim, model.img_size) == (arch, patch, dim, 224)
    assert model.source == "random init"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, dim)


def test_pretrained_downloads_the_released_file_through_torch_hub(monkeypatch):
    # the released teacher, stood in for by seeded random weights; nothing is fetched
    torch.manual_seed(3)
    released = build_untrained("vit_small", 8).model.state_dict()
    asked = []

    def fake_download(url, model_dir=None, map_location=None, progress=True, check_hash=False, file_name=None, weights_only=False):  # fmt: skip
        asked.append((url, map_location, progress, weights_only))
        return {k: v.clone() for k, v in released.items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = torch.hub.load(str(REPO), "dino_vits8", source="local", progress=False)
    url = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    assert asked == [(url, "cpu", False, True)]
    assert isinstance(model, VisionTransformer) and model.patch_size == 8 and model.source == url
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in released.items())


def test_xcit_entries_say_what_exists():
    with pytest.raises(WeightsError, match=r"XCiT backbones are not implemented.*dino_vits16.*dino_resnet50"):
        torch.hub.load(str(REPO), "dino_xcit_small_12_p16", source="local", pretrained=False)


def test_dino_load_returns_the_module_with_its_architecture(tmp_path):
    torch.manual_seed(0)
    saved = build_untrained("vit_tiny", 8, depth=2)
    torch.save(saved.model.state_dict(), tmp_path / "backbone.pth")
    model = dino.load(tmp_path / "backbone.pth")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert (model.arch, model.patch_size, model.embed_dim, model.depth) == ("vit_tiny", 8, 192, 2)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), saved.model(images))
