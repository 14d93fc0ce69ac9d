"""Models as people load released weights: ``torch.hub.load(...)`` entries and ``dino.load(...)``.

Both give the backbone itself, an ``nn.Module`` in eval mode that returns the [CLS] feature (ViTs) or the
pooled feature (ResNets), with what defines it as attributes: ``arch``, ``patch_size`` (0 for ResNets),
``embed_dim``, ``img_size``, ``depth`` and ``source``.

The repository's ``hubconf.py`` exposes the original release's entry names (:data:`HUB_ENTRIES`); with
``pretrained=True`` the weights come from the original release's URLs through
``torch.hub.load_state_dict_from_url`` (cached in torch's hub folder, with a progress bar, written
atomically), never otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino.hub.errors import WeightsError
from dino.hub.loading import LoadedBackbone, load
from dino.hub.releases import RELEASES
from dino.hub.state import backbone_state_dict
from dino.hub.weights import load_strict
from dino.models.backbones import build_backbone

# The original release's XCiT entries: an architecture this project does not build.
XCIT_ENTRIES: tuple[str, ...] = (
    "dino_xcit_small_12_p16",
    "dino_xcit_small_12_p8",
    "dino_xcit_medium_24_p16",
    "dino_xcit_medium_24_p8",
)
HUB_ENTRIES: tuple[str, ...] = (*RELEASES, *XCIT_ENTRIES)
MODEL_ATTRIBUTES: tuple[str, ...] = ("arch", "patch_size", "embed_dim", "img_size", "depth", "source")


def as_module(loaded: LoadedBackbone) -> nn.Module:
    """``loaded.model`` in eval mode, carrying :data:`MODEL_ATTRIBUTES` from ``loaded``."""
    model = loaded.model
    for name in MODEL_ATTRIBUTES:
        setattr(model, name, getattr(loaded, name))
    return model.eval()


def load_model(name_or_path: str | Path, **options: Any) -> nn.Module:
    """:func:`dino.hub.load` (same arguments: a released name, a file, a run directory…), returning the
    ``nn.Module`` itself in eval mode with its architecture as attributes (:func:`as_module`)."""
    return as_module(load(name_or_path, **options))


def hub_model(name: str, pretrained: bool = True, progress: bool = True) -> nn.Module:
    """The backbone of the released model ``name`` (``dino_vits16``…), with the released teacher weights
    when ``pretrained`` (downloaded once through torch.hub, then read from its cache)."""
    if name in XCIT_ENTRIES:
        raise WeightsError(
            f"{name}: XCiT backbones are not implemented in this project; the entries that exist are "
            f"{', '.join(RELEASES)} (or use the original repository: "
            f"torch.hub.load('facebookresearch/dino:main', {name!r}))"
        )
    if name not in RELEASES:
        raise WeightsError(f"unknown DINO model {name!r}; choose one of {', '.join(HUB_ENTRIES)}")
    release = RELEASES[name]
    model, dim = build_backbone(release.arch, release.patch_size or 16)
    source = "random init"
    if pretrained:
        url = release.url()
        content = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=progress, weights_only=True
        )
        load_strict(model, backbone_state_dict(content), url)
        source = url
    depth = len(getattr(model, "blocks", ()))
    return as_module(LoadedBackbone(model, release.arch, release.patch_size, dim, source, depth, 224))
