"""torch.hub entries with the original DINO release's names.

    model = torch.hub.load("PATH/TO/CLONE", "dino_vits16", source="local", pretrained=False)  # offline
    model = torch.hub.load("PATH/TO/CLONE", "dino_vits16", source="local")  # released weights, cached

Each returns the backbone (an ``nn.Module`` in eval mode giving the [CLS] or pooled feature) with ``arch``,
``patch_size``, ``embed_dim``, ``img_size``, ``depth`` and ``source`` attributes. ``pretrained=True`` (the
default, as in the original) downloads the released teacher weights through torch.hub (cached in
``torch.hub.get_dir()``, with a progress bar, written atomically). The XCiT entries are refused: this
project does not build XCiT.
"""

import os
import sys

dependencies = ["torch", "torchvision"]

# From a clone, the package lives under src/ (an installed dino is used when this one is not there).
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "dino")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from dino.hub.torchhub import hub_model  # noqa: E402


def dino_vits16(pretrained=True, progress=True):
    """ViT-S/16 trained with DINO (21M parameters, 384-d features)."""
    return hub_model("dino_vits16", pretrained, progress)


def dino_vits8(pretrained=True, progress=True):
    """ViT-S/8 trained with DINO (21M parameters, 384-d features)."""
    return hub_model("dino_vits8", pretrained, progress)


def dino_vitb16(pretrained=True, progress=True):
    """ViT-B/16 trained with DINO (85M parameters, 768-d features)."""
    return hub_model("dino_vitb16", pretrained, progress)


def dino_vitb8(pretrained=True, progress=True):
    """ViT-B/8 trained with DINO (85M parameters, 768-d features)."""
    return hub_model("dino_vitb8", pretrained, progress)


def dino_resnet50(pretrained=True, progress=True):
    """ResNet-50 trained with DINO (23M parameters, 2048-d features, no classifier)."""
    return hub_model("dino_resnet50", pretrained, progress)


def dino_xcit_small_12_p16(pretrained=True, progress=True):
    """XCiT-S12/16 in the original release: not built by this project (raises a clear error)."""
    return hub_model("dino_xcit_small_12_p16", pretrained, progress)


def dino_xcit_small_12_p8(pretrained=True, progress=True):
    """XCiT-S12/8 in the original release: not built by this project (raises a clear error)."""
    return hub_model("dino_xcit_small_12_p8", pretrained, progress)


def dino_xcit_medium_24_p16(pretrained=True, progress=True):
    """XCiT-M24/16 in the original release: not built by this project (raises a clear error)."""
    return hub_model("dino_xcit_medium_24_p16", pretrained, progress)


def dino_xcit_medium_24_p8(pretrained=True, progress=True):
    """XCiT-M24/8 in the original release: not built by this project (raises a clear error)."""
    return hub_model("dino_xcit_medium_24_p8", pretrained, progress)
