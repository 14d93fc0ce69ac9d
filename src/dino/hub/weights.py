"""Backbone weights from anything the user names, loaded strictly.

:func:`read_backbone_weights` turns a released name, file, run directory or export into backbone tensors
and the architecture they belong to; :func:`load_strict` loads them strictly: a mismatch is an error that
names the keys and the likely cause.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino.checkpoint import CheckpointManager, is_sharded_checkpoint
from dino.hub.errors import WeightsError, Which, short_list
from dino.hub.files import (
    SAFETENSORS_FORMAT,
    SAFETENSORS_FORMAT_VERSION,
    is_safetensors,
    read_safetensors,
    read_weights_file,
)
from dino.hub.releases import RELEASES, resolve_weights
from dino.hub.state import (
    backbone_state_dict,
    check_img_size_applies,
    describe_architecture,
    infer_architecture,
    infer_architecture_or_none,
    pos_embed_grid,
    pos_embed_problem,
)
from dino.models.vision_transformer import VisionTransformer, resample_pos_embed

log = logging.getLogger("dino.hub")  # the package's logger: log records keep the name they always had

# --- Strict loading with actionable errors ----------------------------------------------------------------

# Keys that betray a full model (backbone + DINO head, possibly DDP-wrapped) passed where a backbone belongs.
_FULL_CHECKPOINT_PREFIXES = (
    "module.",
    "backbone.",
    "teacher.",
    "student.",
    "head.mlp.",
    "head.last_layer.",
    "mlp.",
    "last_layer.",
)
# Parameters of timm ViT variants the DINO ViT has no counterpart for.
_TIMM_ONLY_MARKERS = ("fc_norm.", ".ls1.", ".ls2.", "reg_token", "dist_token", "norm_pre.")


def load_strict(
    model: nn.Module, state: dict[str, torch.Tensor], origin: str, *, which: Which | None = None
) -> None:
    """``model.load_state_dict(state, strict=True)``, or a WeightsError that names every mismatch and
    suggests the likely cause (architecture, patch or image size, full checkpoint, student vs teacher)."""
    expected = model.state_dict()
    missing = _stems_first(set(expected) - set(state))
    unexpected = _stems_first(set(state) - set(expected))
    wrong = _stems_first(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong):
        model.load_state_dict(state, strict=True)
        return
    hints = _mismatch_hints(state, expected, missing, unexpected, wrong, which)
    parts = [
        f"missing {short_list(missing)}" if missing else "",
        f"unexpected {short_list(unexpected)}" if unexpected else "",
        "shape mismatch "
        + short_list(
            [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong]
        )
        if wrong
        else "",
    ]
    raise WeightsError(
        f"weights in {origin} do not match the model: "
        + "; ".join(p for p in parts if p)
        + (f". Likely cause: {'; or '.join(hints)}" if hints else "")
    )


def _mismatch_hints(
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    wrong: list[str],
    which: Which | None,
) -> list[str]:
    """The likely causes of a state dict not matching the model, most telling first."""
    hints = []
    found, wanted = infer_architecture_or_none(state), infer_architecture_or_none(expected)
    if found and wanted and found[:2] + found[3:] != wanted[:2] + wanted[3:]:
        hints.append(
            f"the file holds a {describe_architecture(*found)} but the model is a "
            f"{describe_architecture(*wanted)}: build the model with the file's architecture"
        )
    elif set(wrong) == {"pos_embed"}:
        hints.append(
            pos_embed_problem(state)
            or "the file's position embeddings are for another image size: pass img_size=… to resample"
        )
    elif wrong:
        hints.append("the architecture differs (tiny/small/base/large/giant, patch size or ResNet depth)")
    if any(k.startswith(_FULL_CHECKPOINT_PREFIXES) for k in unexpected):
        hints.append(
            "the file is a full training checkpoint (backbone + DINO head): load it with dino.hub.load, "
            "which takes the teacher's backbone"
        )
    if any(marker in k for k in unexpected for marker in _TIMM_ONLY_MARKERS):
        hints.append(
            "it is a timm ViT variant (average pooling, layer scale, registers or distillation token) that "
            "the DINO ViT does not have: only class-token ViTs with a final norm convert"
        )
    if missing and not unexpected and not wrong and not hints:
        hints.append("the file is incomplete or for another architecture")
    if which == "student":
        hints.append("you picked the student; the released backbones and evaluations use the teacher")
    return hints


def _stems_first(keys: Iterable[str]) -> list[str]:
    """Keys sorted with everything outside the repeated blocks first: those say most about a mismatch."""
    return sorted(
        keys,
        key=lambda k: (
            k.removeprefix("module.").removeprefix("backbone.").startswith(("blocks.", "layer")),
            k,
        ),
    )


# --- Backbone weights from anything the user names --------------------------------------------------------


@dataclass(frozen=True)
class BackboneWeights:
    """Backbone tensors in the released key layout, with the architecture they belong to."""

    state: dict[str, torch.Tensor]
    arch: str
    patch_size: int  # 0 for convnets
    img_size: int  # the input size the position embeddings are stored for (224 for convnets)
    depth: int  # ViT blocks (0 for convnets)
    source: str
    which: Which | None = None  # set when taken from a full checkpoint

    def resampled(self, img_size: int) -> BackboneWeights:
        """These weights for ``img_size`` inputs: ViT position embeddings resampled (bicubic) to its patch
        grid, as the model resamples them on the fly, so a model loaded at ``img_size`` gives the features
        the native model gives on ``img_size`` inputs. Refused for backbones without position embeddings."""
        check_img_size_applies(self.arch, img_size)
        state = self.state
        if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
            return replace(self, img_size=img_size)
        pos_embed_grid(state)  # refuses layouts the resampling cannot handle
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        grid = img_size // patch
        if grid < 1 or grid * patch != img_size:
            raise WeightsError(f"img_size {img_size} must be a positive multiple of the patch size {patch}")
        if int(state["pos_embed"].shape[1]) != grid * grid + 1:
            state = {**state, "pos_embed": resample_pos_embed(state["pos_embed"], (grid, grid))}
        return replace(self, state=state, img_size=img_size)


def read_backbone_weights(
    spec: str | Path,
    which: Which = "teacher",
    *,
    arch: str | None = None,
    patch_size: int | None = None,
    weights_dir: str | Path | None = None,
    download: bool = False,
) -> BackboneWeights:
    """Backbone weights from a released name or file, a run directory, one of our checkpoints or exports
    (``.pth`` or ``.safetensors``), a released full checkpoint or a timm ViT state dict.

    The architecture comes from (in order) ``arch``/``patch_size``, the released name, our safetensors
    metadata or checkpoint config, and the tensor shapes. ``which`` picks the teacher or the student of a
    full checkpoint (ours or released) or run directory. A file holding a single backbone gives it for the
    default ``which="teacher"`` (released and run backbone files hold the teacher); ``which="student"`` is
    refused for it unless it is one of our safetensors exports of a student.
    """
    path = resolve_weights(spec, weights_dir, download)
    if path.is_dir() and not is_sharded_checkpoint(path):
        path = _run_weights(path, which)
    state, declared, from_full, labelled = _read_state(path, which)
    if which == "student" and not from_full and labelled != "student":
        raise WeightsError(_no_student_message(path))
    if str(spec) in RELEASES and declared is None:
        release = RELEASES[str(spec)]
        declared = (release.arch, release.patch_size, 0, 0)
    arch_, patch, img, depth = _resolve_architecture(state, declared, arch, patch_size)
    details = [str(path)] if str(spec) != str(path) else []
    details += [which] if from_full else []
    source = f"{spec} ({', '.join(details)})" if details else str(spec)
    return BackboneWeights(state, arch_, patch, img or 224, depth, source, which if from_full else labelled)


def _read_state(
    path: Path, which: Which
) -> tuple[dict[str, torch.Tensor], tuple[str, int, int, int] | None, bool, Which | None]:
    """The backbone's state dict in ``path``; the architecture the file declares (``None``: it does not say);
    whether the file is a full checkpoint (teacher and student); which backbone an export says it holds."""
    declared: tuple[str, int, int, int] | None = None
    from_full = False
    labelled: Which | None = None  # the backbone a single-backbone export of ours says it holds
    if is_safetensors(path):
        tensors, meta = read_safetensors(path)
        state = backbone_state_dict(tensors, which)
        if meta.get("format") == SAFETENSORS_FORMAT:
            declared = _declared_by_metadata(meta, path)
            stated = meta.get("which")
            labelled = "teacher" if stated == "teacher" else "student" if stated == "student" else None
    else:
        obj = read_weights_file(path)
        state = backbone_state_dict(obj, which)
        from_full = isinstance(obj, dict) and ("teacher" in obj or "student" in obj)
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict):  # one of our training checkpoints
            declared = _declared_by_config(obj["config"])
    return state, declared, from_full, labelled


def _resolve_architecture(
    state: dict[str, torch.Tensor],
    declared: tuple[str, int, int, int] | None,
    arch: str | None,
    patch_size: int | None,
) -> tuple[str, int, int, int]:
    """Architecture, patch size, image size (0: unknown) and depth from ``arch``/``patch_size``, what the
    file or release declared and the tensor shapes, in that order."""
    inferred = infer_architecture_or_none(state)
    pos_embed_grid(state)  # a position-embedding layout we cannot use is refused whatever declared the arch
    base = declared or inferred
    if base is not None:
        arch_, patch, img, depth = base
    elif arch is not None:
        arch_, patch, img, depth = arch, patch_size or 16, 0, 0
    else:
        arch_, patch, img, depth = infer_architecture(state)  # raises the explanation
    if inferred is not None:  # what a name or config leaves open (0) comes from the tensor shapes
        img, depth = img or inferred[2], depth or inferred[3]
    if arch is not None and arch != arch_:
        arch_, depth = arch, inferred[3] if inferred is not None else 0
    patch = patch_size or patch
    if not arch_.startswith("vit_"):
        patch, depth = 0, 0
    return arch_, patch, img, depth


def _run_weights(run_dir: Path, which: Which) -> Path:
    """The file a run directory's backbones are read from: its newest checkpoint, or the kept
    ``teacher_backbone.pth`` of a run without checkpoints (the teacher only)."""
    newest = CheckpointManager(run_dir).rolling()
    kept_teacher = (run_dir / "teacher_backbone.pth").is_file()
    if which == "teacher" and kept_teacher and not newest:
        return run_dir / "teacher_backbone.pth"
    if not newest and kept_teacher:
        raise WeightsError(
            f"{run_dir} kept only the teacher backbone (teacher_backbone.pth) and no training checkpoint: "
            "the student needs a checkpoint in checkpoints/. Drop --which student (which='student') to use "
            "the teacher, or point at a run that kept its checkpoints"
        )
    if not newest:
        raise WeightsError(
            f"{run_dir} has no checkpoints/ and no teacher_backbone.pth; is it a dino run directory?"
        )
    return newest[0]


def _no_student_message(path: Path) -> str:
    return (
        f"{path} holds one backbone and no student: a released backbone file, or a run's "
        "teacher_backbone.pth, is the teacher. Drop --which student (which='student') to use it, or give a "
        "full training checkpoint or a run directory with checkpoints/ to get the student"
    )


def _declared_by_metadata(meta: dict[str, str], path: Path) -> tuple[str, int, int, int]:
    try:
        version = int(meta.get("format_version", "0"))
        declared = meta["arch"], int(meta["patch_size"]), int(meta["img_size"]), int(meta["depth"])
    except (KeyError, ValueError) as err:
        raise WeightsError(f"{path}: incomplete dino metadata ({err}); re-export the file") from err
    if version > SAFETENSORS_FORMAT_VERSION:
        raise WeightsError(
            f"{path} was written by a newer dino (format_version {version}); upgrade dino to read it"
        )
    return declared


def _declared_by_config(config: dict[str, Any]) -> tuple[str, int, int, int] | None:
    model, data = config.get("model", {}), config.get("data", {})
    if not isinstance(model, dict) or "arch" not in model:
        return None
    return (
        str(model["arch"]),
        int(model.get("patch_size", 16)),
        int(data.get("global_crop_size", 0)) if isinstance(data, dict) else 0,
        int(model.get("depth", 0)),
    )


def load_backbone_weights(model: nn.Module, path: str | Path, which: Which = "teacher") -> None:
    """Load backbone weights from ``path`` (any supported file, run directory or released name) into
    ``model`` strictly. ViT position embeddings are resampled to the model's input size if that differs."""
    weights = read_backbone_weights(path, which)
    if isinstance(model, VisionTransformer) and "pos_embed" in weights.state:
        spec = model.spec
        if spec.patch_size == weights.patch_size and spec.img_size != weights.img_size:
            log.info(
                "resampling position embeddings of %s from %d to %d px", path, weights.img_size, spec.img_size
            )
            weights = weights.resampled(spec.img_size)
    load_strict(model, weights.state, weights.source, which=weights.which)
