"""The typed configuration of a fine-tuning run: defaults (DeiT's recipe), YAML presets, dotted overrides.

Read with the loader every dino command uses (:func:`dino.config.merge_typed_config`): defaults ← preset
or YAML file ← ``key=value`` overrides, validated before any image is read. The ``run`` section is
``dino train``'s own (:class:`dino.config.RunConfig`: epochs, batch, precision, device, checkpoints,
logging), checked by the same rules. Presets live in ``dino/configs/finetune/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dino.config import (
    CONFIG_VERSION,
    LogConfig,
    RunConfig,
    _require,
    _validate_log,
    _validate_run,
    _validate_run_options,
    merge_typed_config,
    packaged_yaml_names,
    resolve_packaged_yaml,
)

MixMode = Literal["batch", "pair", "elem"]
ReMode = Literal["const", "rand", "pixel"]
Interpolation = Literal["bicubic", "bilinear", "random"]


@dataclass
class FinetuneModelConfig:
    weights: str | None = None  # what `--weights` names: a run, checkpoint, export or released name
    weights_dir: str | None = None  # folder of released weights files (default: $DINO_HOME)
    which: Literal["teacher", "student"] = "teacher"  # network of a training checkpoint to start from
    random_init: bool = False  # the same architecture untrained: the baseline
    init_seed: int = 0  # seed of the random-init backbone and of the new head
    drop_path_rate: float = 0.1  # stochastic depth (ViT backbones); DeiT: 0.1
    head_init_std: float = 0.01  # the new linear classifier: truncated normal weights, zero bias


@dataclass
class FinetuneDataConfig:
    train: str | None = None  # labelled folder (one sub-folder per class)
    val: str | None = None  # labelled held-out folder, evaluated after every epoch and at the end
    img_size: int = 224  # training crop and evaluation crop (ViT position embeddings are resampled)
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, centre crop img_size (DeiT)
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    interpolation: Interpolation = "bicubic"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = -1  # -1: one per CPU core, at most 8
    min_valid_fraction: float = 0.5  # stop before training when more sampled files than this fail


@dataclass
class AugmentConfig:
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec (DeiT); null disables
    color_jitter: float = 0.3  # used only without auto_augment (timm's rule)
    hflip: float = 0.5
    re_prob: float = 0.25  # random erasing (DeiT: 0.25, per-pixel random values)
    re_mode: ReMode = "pixel"
    re_count: int = 1


@dataclass
class MixupConfig:
    mixup_alpha: float = 0.8  # DeiT's; 0 disables Mixup
    cutmix_alpha: float = 1.0  # DeiT's; 0 disables CutMix
    prob: float = 1.0  # probability of mixing a batch
    switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on
    mode: MixMode = "batch"
    label_smoothing: float = 0.1


@dataclass
class FinetuneOptimConfig:
    lr: float = 5e-4  # for a total batch of 512 (DeiT's rule); scaled linearly with the total batch
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5
    weight_decay: float = 0.05  # none on biases, norms, [CLS] and position embeddings
    layer_decay: float = 1.0  # layer-wise lr decay: rate = lr × decay^(depth + 1 − layer); 1 disables
    clip_grad: float = 0.0  # global gradient-norm clipping; 0 disables (DeiT)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class FinetuneConfig:
    version: int = CONFIG_VERSION
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    run: RunConfig = field(
        default_factory=lambda: RunConfig(epochs=300, batch_size=64, output_dir="runs/finetune")
    )
    log: LogConfig = field(default_factory=LogConfig)  # TensorBoard / W&B, as for dino train


def finetune_preset_names() -> list[str]:
    return packaged_yaml_names("finetune")


def resolve_finetune_preset(name_or_path: str) -> Path:
    """A fine-tuning preset name (``deit_vit_small16``) or a YAML path."""
    return resolve_packaged_yaml(name_or_path, "finetune", what="fine-tuning config")


def load_finetune_config(
    config: str | Path | None = None, overrides: list[str] | None = None
) -> FinetuneConfig:
    """Defaults ← preset/YAML ← ``key=value`` overrides, validated."""
    path = resolve_finetune_preset(str(config)) if config is not None else None
    cfg = merge_typed_config(FinetuneConfig, path, overrides)
    validate_finetune(cfg)
    return cfg


def validate_finetune(cfg: FinetuneConfig) -> None:
    """Refuse every out-of-range value up front, naming the key and what is allowed."""
    m, d, a, x, o, r = cfg.model, cfg.data, cfg.augment, cfg.mixup, cfg.optim, cfg.run
    _require(
        m.weights is not None,
        "model.weights",
        "name the backbone to fine-tune: --weights PATH_OR_NAME (with --random-init: its architecture, untrained)",
    )
    _require(
        0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", f"must be in [0, 1), got {m.drop_path_rate}"
    )
    _require(m.head_init_std > 0, "model.head_init_std", f"must be > 0, got {m.head_init_std}")
    for key in ("train", "val"):
        value = getattr(d, key)
        _require(value is not None, f"data.{key}", f"give a labelled image folder: --{key} DIR")
        _require(
            Path(str(value)).expanduser().is_dir(), f"data.{key}", f"{value!r} is not an existing folder"
        )
    _require(d.img_size >= 8, "data.img_size", f"must be at least 8 pixels, got {d.img_size}")
    _require(0.0 < d.crop_pct <= 1.0, "data.crop_pct", f"must be in (0, 1], got {d.crop_pct}")
    _require(
        len(d.scale) == 2 and 0 < d.scale[0] <= d.scale[1] <= 1,
        "data.scale",
        f"must be [low, high] with 0 < low <= high <= 1, got {list(d.scale)}",
    )
    _require(
        len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
        "data.mean/std",
        "need 3 values each, std > 0",
    )
    _require(
        d.num_workers >= -1, "data.num_workers", f"must be >= 0 (or -1 for automatic), got {d.num_workers}"
    )
    _require(0.0 <= d.min_valid_fraction <= 1.0, "data.min_valid_fraction", "must be in [0, 1]")
    if a.auto_augment is not None:
        _require(
            a.auto_augment.startswith(("rand", "augmix", "v0", "original", "3a")),
            "augment.auto_augment",
            f"must be a timm policy such as 'rand-m9-mstd0.5-inc1' (or null), got {a.auto_augment!r}",
        )
    for key in ("hflip", "re_prob"):
        _require(0.0 <= getattr(a, key) <= 1.0, f"augment.{key}", f"must be in [0, 1], got {getattr(a, key)}")
    _require(a.color_jitter >= 0, "augment.color_jitter", f"must be >= 0, got {a.color_jitter}")
    _require(a.re_count >= 1, "augment.re_count", f"must be >= 1, got {a.re_count}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        _require(getattr(x, key) >= 0, f"mixup.{key}", f"must be >= 0 (0 disables), got {getattr(x, key)}")
    for key in ("prob", "switch_prob"):
        _require(0.0 <= getattr(x, key) <= 1.0, f"mixup.{key}", f"must be in [0, 1], got {getattr(x, key)}")
    _require(
        0.0 <= x.label_smoothing < 1.0, "mixup.label_smoothing", f"must be in [0, 1), got {x.label_smoothing}"
    )
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    for key in ("min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "clip_grad"):
        _require(getattr(o, key) >= 0, f"optim.{key}", f"must be >= 0, got {getattr(o, key)}")
    _require(
        0.0 < o.layer_decay <= 1.0,
        "optim.layer_decay",
        f"must be in (0, 1] (1 disables), got {o.layer_decay}",
    )
    _require(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        "optim.betas",
        f"must be two values in [0, 1), got {list(o.betas)}",
    )
    _validate_run(r)
    _validate_run_options(r)
    _validate_log(cfg.log)
    _require(
        r.max_minutes == 0,
        "run.max_minutes",
        "is a dino train setting (a time budget for studies); fine-tuning runs for run.epochs: leave it at 0",
    )
    _require(
        not mixes(cfg) or r.batch_size % 2 == 0,
        "run.batch_size",
        f"Mixup/CutMix pair each image with another of its batch: use an even batch size, got {r.batch_size}",
    )
    _require(not r.compile, "run.compile", "is not used by fine-tuning: set it to false")
    _require(r.profile_steps == 0, "run.profile_steps", "is not used by fine-tuning: set it to 0")


def mixes(cfg: FinetuneConfig) -> bool:
    """Whether batches are mixed (Mixup or CutMix on, with a non-zero probability)."""
    x = cfg.mixup
    return (x.mixup_alpha > 0 or x.cutmix_alpha > 0) and x.prob > 0
