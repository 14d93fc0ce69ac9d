"""Loading weights safely and exactly: the released DINO files, our runs and exports, timm state dicts.

Files are read without executing anything, their keys normalised and the weights loaded strictly, with
errors that name the mismatch and its likely cause. The modules:

- :mod:`~dino.hub.releases`: the released model names, the cache folder (``$DINO_HOME``) and downloads
  (only on ``download=True``);
- :mod:`~dino.hub.files`: reading ``.pth`` (weights only) and ``.safetensors`` files;
- :mod:`~dino.hub.state`: key normalisation, architecture inference, position-embedding checks;
- :mod:`~dino.hub.weights`: backbone weights from anything the user names (resampled to another input size
  on request), and strict loading;
- :mod:`~dino.hub.loading`: the public loader :func:`load`, and :func:`build_untrained` for baselines;
- :mod:`~dino.hub.checkpoints`: training checkpoints, ours and the released full ones, and the image
  settings a run was trained with;
- :mod:`~dino.hub.export`: a backbone out to the released layout, safetensors or timm;
- :mod:`~dino.hub.graph_export`: a backbone out as a graph (ONNX, ``torch.export``), checked against PyTorch;
- :mod:`~dino.hub.torchhub`: the ``torch.hub`` entries of ``hubconf.py`` and ``dino.load`` (the backbone as
  an ``nn.Module`` with its architecture as attributes).

Everything but the last two is importable from ``dino.hub`` itself (they import on use: the exporters
and torch.hub are not needed to load weights).
"""

from dino.hub.checkpoints import (
    TrainingImageSettings,
    config_from_released_args,
    load_training_checkpoint,
    released_checkpoint_config,
    training_image_settings,
)
from dino.hub.errors import WeightsError, Which
from dino.hub.export import EXPORT_FORMATS, Exported, ExportFormat, export_backbone
from dino.hub.files import (
    SAFETENSORS_FORMAT,
    SAFETENSORS_FORMAT_VERSION,
    is_safetensors,
    read_safetensors,
    read_weights_file,
)
from dino.hub.loading import LoadedBackbone, build_untrained, load
from dino.hub.releases import (
    DEFAULT_HOME,
    ENV_HOME,
    RELEASES,
    Release,
    resolve_weights,
    weights_folder,
)
from dino.hub.state import (
    backbone_state_dict,
    check_img_size_applies,
    describe_architecture,
    infer_architecture,
    pos_embed_grid,
)
from dino.hub.weights import BackboneWeights, load_backbone_weights, load_strict, read_backbone_weights

__all__ = [
    "DEFAULT_HOME",
    "ENV_HOME",
    "EXPORT_FORMATS",
    "RELEASES",
    "SAFETENSORS_FORMAT",
    "SAFETENSORS_FORMAT_VERSION",
    "BackboneWeights",
    "ExportFormat",
    "Exported",
    "LoadedBackbone",
    "Release",
    "TrainingImageSettings",
    "WeightsError",
    "Which",
    "backbone_state_dict",
    "build_untrained",
    "check_img_size_applies",
    "config_from_released_args",
    "describe_architecture",
    "export_backbone",
    "infer_architecture",
    "is_safetensors",
    "load",
    "load_backbone_weights",
    "load_strict",
    "load_training_checkpoint",
    "pos_embed_grid",
    "read_backbone_weights",
    "read_safetensors",
    "read_weights_file",
    "released_checkpoint_config",
    "resolve_weights",
    "training_image_settings",
    "weights_folder",
]
