"""One typed configuration for a DINO run: defaults, YAML presets, dotted overrides, validation.

``load_config(preset_or_path, overrides)`` merges the defaults below (the paper's ViT-S/16 recipe) with a
preset or YAML file and ``key=value`` overrides, then validates every value before any work starts.
Training runs from it; :mod:`dino.hub` rebuilds one for a released checkpoint, so it sits below both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dino.devices import DEVICE_NAMES, PrecisionName, is_device_name
from dino.loss import LossKind, TeacherNorm
from dino.models.backbones import available_archs, is_resnet
from dino.models.head import HeadActivation
from dino.models.vision_transformer import VIT_SIZES
from dino.teacher import TeacherMode

# The string-valued settings with a fixed set of values: OmegaConf refuses any other value when it merges a
# preset, a checkpoint's settings or an override, naming the key and the allowed values.
OptimName = Literal["adamw", "sgd", "lars"]
AugmentOn = Literal["auto", "workers", "device"]
ProgressBar = Literal["auto", "always", "never"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[CompileMode, ...] = get_args(CompileMode)
Strategy = Literal["ddp", "fsdp"]  # issue 22: how the student (and teacher) are spread over processes

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and what is allowed."""


@dataclass
class ModelConfig:
    arch: str = "vit_small"
    patch_size: int = 16
    depth: int = 0  # ViT blocks; 0 = the size's standard depth (12, or 24 for large)
    drop_path_rate: float = 0.1  # stochastic depth on the student only
    pretrained: str | None = None  # backbone weights to start from (a fresh head is trained on top)
    activation_checkpointing: bool = False  # ViT: recompute blocks in the backward (memory for compute)


@dataclass
class HeadConfig:
    out_dim: int = 65536  # K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True
    freeze_last_layer: int = 1  # epochs during which the last layer gets no updates
    # The appendix's head studies: the L2-normalised bottleneck (off: the MLP's output goes to the last
    # layer as it is) and the MLP's activation.
    l2_bottleneck: bool = True
    activation: HeadActivation = "gelu"
    # A predictor MLP on the student only (BYOL-style, the paper's "Pred." column): bottleneck -> hidden ->
    # bottleneck between the student's MLP and its L2 normalisation; the teacher has none.
    predictor: bool = False
    predictor_hidden_dim: int = 0  # 0: head.hidden_dim


@dataclass
class LossConfig:
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04  # the paper: linear warm-up 0.04 -> 0.07 over the first 30 epochs
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    teacher_norm: TeacherNorm = "centering"  # centering | sinkhorn | batch_softmax | none (paper ablations)
    # cross_entropy: DINO's loss; mse: squared distance between L2-normalised outputs, no temperatures and no
    # sharpening (BYOL's loss, the paper's "MSE" rows); with teacher_norm=centering the teacher output is
    # centred first (rows 2 and 9 of the paper's BYOL table), with none it is used as it is.
    kind: LossKind = "cross_entropy"


@dataclass
class TeacherConfig:
    mode: TeacherMode = "momentum"  # momentum | student | previous_iter | previous_epoch
    momentum: float = 0.996  # start of the cosine schedule to final_momentum
    final_momentum: float = 1.0


@dataclass
class OptimConfig:
    name: OptimName = "adamw"  # adamw | sgd | lars
    lr: float = 0.0005  # for a total batch of 256; scaled linearly with the total batch size
    min_lr: float = 1e-6
    warmup_epochs: float = 10  # fractions allowed: short runs warm up over part of an epoch
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.9  # sgd / lars
    clip_grad: float = 3.0  # 0 disables


@dataclass
class DataConfig:
    path: str | None = None  # folder of images (class sub-folders optional); None = bundled sample
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_crops_number: int = 8
    global_crop_size: int = 224
    local_crop_size: int = 96
    # Gaussian blur (sigma 0.1-2 px) probability for global view 1, global view 2 and local views, and the
    # solarization probability of global view 2. Blur of a few pixels erases 32x32 images: small-image
    # recipes turn it off.
    blur_probs: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])
    solarize_prob: float = 0.2
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Where the multi-crop augmentation runs: "workers" (PIL, image by image in loader processes),
    # "device" (batched tensors on run.device; workers only read bytes, JPEGs decoded on the GPU), or
    # "auto" (device on a GPU, workers on the CPU).
    augment_on: AugmentOn = "auto"
    # CPU pipeline (augment_on=workers): decode large JPEGs at 1/2, 1/4 or 1/8 size when every crop still
    # has at least as many pixels as its output (libjpeg DCT scaling: far less decoding for big photos).
    reduced_decode: bool = True
    # Decode every image once and keep the pixels (uint8) on the augmentation device: for small datasets
    # (CIFAR-10: 138 MB), whose files would otherwise be read and decoded again at every epoch. Needs the
    # augmentation on the device; refused when the images would take over half of its free memory.
    in_memory: bool = False
    num_workers: int = -1  # -1: one per CPU core, at most 8
    min_valid_fraction: float = 0.5  # stop before training when more files than this fail to decode


@dataclass
class RunConfig:
    epochs: int = 100
    batch_size: int = 64  # per process
    precision: PrecisionName = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | mps | cuda | cuda:N
    seed: int = 0
    output_dir: str = "runs/dino"
    log_every: int = 10  # iterations between log lines
    save_every_epochs: int = 20  # periodic checkpoints kept for good; 0 disables
    keep_last: int = 2  # rolling checkpoints kept
    # Rolling checkpoint at the end of every N-th epoch (and always after the last one): for recipes whose
    # epochs take seconds (CIFAR on a GPU), where writing one at every epoch end would cost a good share of
    # the run. A crash then loses at most N epochs; checkpoint_every_minutes bounds that in time instead.
    checkpoint_every_epochs: int = 1
    checkpoint_every_iters: int = 0  # mid-epoch checkpoints; 0 = only at epoch ends
    checkpoint_every_minutes: float = 0.0  # mid-epoch checkpoints by wall time; 0 disables
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated (skipped) before stopping
    # A time budget: the run ends (checkpoint, teacher backbone) at the first epoch end after this many
    # minutes of training, counted across resumes; the schedules stay those of run.epochs. 0: no limit.
    max_minutes: float = 0.0
    progress_bar: ProgressBar = "auto"  # auto (on a terminal) | always | never
    compile: bool = False  # torch.compile the student's and teacher's backbones
    # torch.compile mode, used with run.compile=true (ignored without, so that run.compile=false alone turns
    # a compiled preset eager): default | reduce-overhead (adds CUDA graphs: the fastest on GPUs) |
    # max-autotune | max-autotune-no-cudagraphs
    compile_mode: CompileMode = "default"
    profile_steps: int = 0  # profile this many steps after the first 10 (profile.* in the run dir); 0: off
    deterministic: bool = False  # deterministic algorithms (bit-exact resume on CPU)
    # How long a process waits in a collective for the others (torch's NCCL default is 10 minutes): the
    # k-NN monitor runs on the first process only while the others wait, for as long as its bank takes.
    dist_timeout_minutes: float = 60.0
    # Several processes: ddp (a full copy of the models on each) | fsdp (FSDP2: the student and the teacher
    # sharded per ViT block and head; torch.distributed.checkpoint checkpoints, resumable on any number of
    # processes). One process trains the same way with either.
    strategy: Strategy = "ddp"


@dataclass
class MonitorConfig:
    collapse: bool = True  # warn when the teacher entropy reaches 0 or ln K, or the KL reaches 0
    knn_every: int = 0  # epochs between online k-NN evaluations; 0 disables
    knn_train: str | None = None  # labelled folder for the k-NN bank (default: training data if labelled)
    knn_val: str | None = None  # labelled folder of held-out images
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_student: bool = False  # also score the student at each k-NN point (teacher vs student, paper Fig. 6)
    knn_resize: int = 0  # eval resize (shorter side); 0 = global_crop_size * 8 / 7


@dataclass
class LogConfig:
    """Where a run's records go besides ``log.jsonl`` (main process only): TensorBoard, Weights & Biases."""

    tensorboard: bool = False  # event files under RUN/tensorboard/ (pip install 'dino[tensorboard]')
    wandb: bool = False  # a W&B run (pip install 'dino[wandb]'); WANDB_MODE=offline works without network
    wandb_project: str | None = None  # needed with log.wandb=true
    wandb_entity: str | None = None  # team or user; None: W&B's default entity
    wandb_name: str | None = None  # display name; None: the run directory's name
    images: int = 8  # augmented crops shown at the start, and attention maps at each k-NN point; 0: none


@dataclass
class DINOConfig:
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    log: LogConfig = field(default_factory=LogConfig)


def packaged_yaml_names(folder: str = "") -> list[str]:
    """The YAML files shipped in ``dino/configs/<folder>``, by name (presets, fine-tuning presets, studies)."""
    root = files("dino.configs")
    if folder:
        root = root / folder
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_packaged_yaml(
    name_or_path: str | Path, folder: str = "", what: str = "config", shipped: str = "preset"
) -> Path:
    """A YAML file's path, or the shipped ``dino/configs/<folder>/<name>.yaml``; a ConfigError naming the
    shipped ones otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    root = files("dino.configs")
    packaged = (root / folder if folder else root) / f"{name_or_path}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    raise ConfigError(
        f"{what} {str(name_or_path)!r} is neither a YAML file nor a {shipped}; the {shipped.split()[-1]} files: "
        f"{', '.join(packaged_yaml_names(folder))}"
    )


def preset_names() -> list[str]:
    return packaged_yaml_names()


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``vit_small_100ep``) or a YAML path."""
    return resolve_packaged_yaml(name_or_path, what="config")


def load_config(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> DINOConfig:
    """Defaults ← ``base`` ← preset/YAML ← ``key=value`` overrides, validated. ``base`` (plain data): the
    settings of a checkpoint to continue from, which the preset and the overrides may still change."""
    path = resolve_preset(str(config)) if config is not None else None
    cfg = merge_typed_config(DINOConfig, path, overrides, base)
    validate(cfg)
    return cfg


def merge_typed_config(
    schema: type[Any],
    path: Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Any:
    """An instance of the dataclass ``schema``: its defaults ← ``base`` ← the YAML file ``path`` ←
    ``key=value`` overrides, each merged by OmegaConf against the typed fields (a wrong type, a value
    outside a ``Literal`` or an unknown key is a :class:`ConfigError` naming the key and the source). Not
    validated: the caller checks ranges. Shared by every command that reads a typed configuration."""
    merged = OmegaConf.structured(schema)
    sources: list[tuple[str, Any]] = []
    if base is not None:
        sources.append(("the checkpoint", OmegaConf.create(base)))
    if path is not None:
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config {path} must be a mapping of sections (model:, run:, …)")
        _check_version(loaded.get("version", CONFIG_VERSION), str(path))
        sources.append((str(path), loaded))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like section.key=value, got {bad}")
        sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for origin, source in sources:
        try:
            merged = OmegaConf.merge(merged, source)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or ""
            if key and not isinstance(err, ConfigKeyError):
                # a known key with a value of the wrong type, or not among its Literal's values
                raise ConfigError(f"{key}: {_first_line(err)} (from {origin})") from err
            raise ConfigError(
                f"invalid config key or value {key!r} from {origin}: {_first_line(err)}; "
                f"valid sections: {', '.join(f.name for f in fields(schema))}"
            ) from err
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, schema)
    return cfg


def config_from_dict(data: dict[str, Any]) -> DINOConfig:
    """Rebuild a config saved in a checkpoint or run directory (plain data)."""
    _check_version(data.get("version", CONFIG_VERSION), "the checkpoint")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DINOConfig), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"saved config does not match this version of dino: {_first_line(err)}") from err
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DINOConfig)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A typed configuration (a run's :class:`DINOConfig`, a fine-tuning run's config) as plain data."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    return {str(key): value for key, value in container.items()}


def save_config(cfg: Any, path: Path) -> None:
    """A typed configuration as the YAML that ``--config`` reads back."""
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _check_version(version: Any, origin: str) -> None:
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"config version {version!r} in {origin} is not supported (this dino reads version {CONFIG_VERSION}); "
            f"start from a current preset (`dino presets`) and copy your changes over"
        )


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: DINOConfig) -> None:
    """Refuse every out-of-range value up front, naming the key and the allowed values (section by section,
    in the order of the configuration). The settings typed ``Literal[...]`` (``optim.name``, ``run.precision``,
    …) are checked by OmegaConf as it merges them (:func:`load_config`); this checks ranges, free-form names
    and combinations."""
    _validate_model(cfg.model)
    _validate_head(cfg.head)
    _validate_loss(cfg.loss)
    _validate_teacher(cfg.teacher)
    _validate_optim(cfg.optim)
    _validate_augmentation(cfg.data, cfg.model)
    _validate_loading(cfg.data)
    _validate_run(cfg.run)
    _validate_run_options(cfg.run)
    _validate_monitor(cfg.monitor, cfg.data)
    _validate_log(cfg.log)
    _validate_strategy(cfg)


def _validate_model(m: ModelConfig) -> None:
    known = (
        is_resnet(m.arch)
        or m.arch.startswith("timm:")
        or m.arch.removeprefix("vit_") in VIT_SIZES
        and m.arch.startswith("vit_")
    )
    _require(known, "model.arch", f"unknown architecture {m.arch!r}; choose one of {available_archs()}")
    _require(m.depth >= 0, "model.depth", f"must be >= 0 (0 = the architecture's own depth), got {m.depth}")
    _require(m.patch_size >= 1, "model.patch_size", f"must be a positive integer, got {m.patch_size}")
    _require(
        0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", f"must be in [0, 1), got {m.drop_path_rate}"
    )
    _require(
        not m.activation_checkpointing or m.arch.startswith("vit_"),
        "model.activation_checkpointing",
        f"is available for the vit_* backbones only, not {m.arch!r}: set it to false",
    )


def _validate_head(h: HeadConfig) -> None:
    _require(h.out_dim >= 2, "head.out_dim", f"K must be at least 2, got {h.out_dim}")
    _require(
        h.predictor_hidden_dim >= 0,
        "head.predictor_hidden_dim",
        f"must be >= 0 (0 = head.hidden_dim), got {h.predictor_hidden_dim}",
    )
    for key in ("hidden_dim", "bottleneck_dim", "nlayers"):
        _require(getattr(h, key) >= 1, f"head.{key}", f"must be a positive integer, got {getattr(h, key)}")
    _require(
        h.freeze_last_layer >= 0, "head.freeze_last_layer", f"must be >= 0 epochs, got {h.freeze_last_layer}"
    )


def _validate_loss(lo: LossConfig) -> None:
    _require(lo.student_temp > 0, "loss.student_temp", f"must be > 0, got {lo.student_temp}")
    # tau_t = 0 is the sharpening table's first column: one-hot targets (the argmax), fixed for the run.
    argmax = lo.teacher_temp == 0 and lo.warmup_teacher_temp == 0
    for key in ("teacher_temp", "warmup_teacher_temp"):
        _require(
            getattr(lo, key) > 0 or argmax,
            f"loss.{key}",
            f"must be > 0, got {getattr(lo, key)} (0 is allowed for both loss.teacher_temp and "
            "loss.warmup_teacher_temp together: one-hot teacher targets)",
        )
    _require(
        lo.kind == "cross_entropy" or lo.teacher_norm in ("centering", "none"),
        "loss.teacher_norm",
        f"{lo.teacher_norm} makes the teacher output a distribution, which loss.kind=mse does not compare: "
        "use centering or none with mse",
    )
    _require(lo.warmup_teacher_temp_epochs >= 0, "loss.warmup_teacher_temp_epochs", "must be >= 0")
    _require(
        0.0 <= lo.center_momentum < 1.0,
        "loss.center_momentum",
        f"must be in [0, 1), got {lo.center_momentum}",
    )


def _validate_teacher(t: TeacherConfig) -> None:
    for key in ("momentum", "final_momentum"):
        _require(0.0 <= getattr(t, key) <= 1.0, f"teacher.{key}", f"must be in [0, 1], got {getattr(t, key)}")


def _validate_optim(o: OptimConfig) -> None:
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    _require(o.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {o.min_lr}")
    # Warmups longer than the run are cut at its end (useful for short trial runs of a long recipe).
    _require(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    _require(0.0 <= o.momentum < 1.0, "optim.momentum", f"must be in [0, 1) (sgd and lars), got {o.momentum}")
    for key in ("weight_decay", "weight_decay_end", "clip_grad"):
        _require(getattr(o, key) >= 0, f"optim.{key}", f"must be >= 0, got {getattr(o, key)}")


def _validate_augmentation(d: DataConfig, m: ModelConfig) -> None:
    for key in ("global_crops_scale", "local_crops_scale"):
        scale = getattr(d, key)
        _require(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            f"data.{key}",
            f"must be [low, high] with 0 < low <= high <= 1, got {list(scale)}",
        )
    _require(
        d.local_crops_number >= 0, "data.local_crops_number", f"must be >= 0, got {d.local_crops_number}"
    )
    for key in ("global_crop_size", "local_crop_size"):
        size = getattr(d, key)
        _require(size >= 1, f"data.{key}", f"must be a positive number of pixels, got {size}")
        if m.arch.startswith("vit_") and (key == "global_crop_size" or d.local_crops_number > 0):
            _require(
                size >= m.patch_size,
                f"data.{key}",
                f"{size}px is smaller than the patch size model.patch_size={m.patch_size}; use a larger crop or a smaller patch",
            )
    _require(
        len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
        "data.mean/std",
        "need 3 values each, std > 0",
    )
    _require(
        len(d.blur_probs) == 3 and all(0.0 <= p <= 1.0 for p in d.blur_probs),
        "data.blur_probs",
        f"must be 3 probabilities in [0, 1] (global 1, global 2, local), got {list(d.blur_probs)}",
    )
    _require(0.0 <= d.solarize_prob <= 1.0, "data.solarize_prob", f"must be in [0, 1], got {d.solarize_prob}")


def _validate_loading(d: DataConfig) -> None:
    _require(
        not (d.in_memory and d.augment_on == "workers"),
        "data.in_memory",
        "keeps decoded images for the batched augmentation, which data.augment_on=workers does not use; "
        "set data.augment_on=device (or auto on a GPU), or data.in_memory=false",
    )
    _require(
        d.num_workers >= -1, "data.num_workers", f"must be >= 0 (or -1 for automatic), got {d.num_workers}"
    )
    _require(0.0 <= d.min_valid_fraction <= 1.0, "data.min_valid_fraction", "must be in [0, 1]")
    if d.path is not None and str(d.path).endswith(".tar"):  # WebDataset shards (dino.data.shards)
        from dino.data.shards import shard_pattern_problem

        problem = shard_pattern_problem(str(d.path))
        _require(problem is None, "data.path", problem or "")
    elif d.path is not None:
        _require(
            Path(d.path).expanduser().is_dir(),
            "data.path",
            f"{d.path!r} is not an existing folder; pass --data DIR with your images "
            "(or WebDataset shards: a path ending in .tar, e.g. 'OUT/shard-{000000..000099}.tar')",
        )


def _validate_run(r: RunConfig) -> None:
    _require(r.epochs >= 1, "run.epochs", f"must be >= 1, got {r.epochs}")
    _require(r.batch_size >= 1, "run.batch_size", f"must be >= 1, got {r.batch_size}")
    _require(r.max_minutes >= 0, "run.max_minutes", f"must be >= 0 (0: no time limit), got {r.max_minutes}")
    _require(is_device_name(r.device), "run.device", f"must be {DEVICE_NAMES}, got {r.device!r}")
    _require(
        not (r.precision == "fp16" and r.device == "cpu"),
        "run.precision",
        f"fp16 (with a gradient scaler) needs a GPU; on run.device={r.device} use fp32 or bf16",
    )


def _validate_run_options(r: RunConfig) -> None:
    for key in ("log_every", "keep_last", "checkpoint_every_epochs"):
        _require(getattr(r, key) >= 1, f"run.{key}", f"must be >= 1, got {getattr(r, key)}")
    for key in (
        "save_every_epochs",
        "checkpoint_every_iters",
        "checkpoint_every_minutes",
        "max_bad_steps",
        "profile_steps",
    ):
        _require(getattr(r, key) >= 0, f"run.{key}", f"must be >= 0, got {getattr(r, key)}")
    _require(
        r.dist_timeout_minutes > 0,
        "run.dist_timeout_minutes",
        f"must be > 0 minutes, got {r.dist_timeout_minutes}",
    )


def _validate_monitor(mon: MonitorConfig, d: DataConfig) -> None:
    _require(mon.knn_every >= 0, "monitor.knn_every", "must be >= 0")
    _require(mon.knn_k >= 1, "monitor.knn_k", f"must be >= 1, got {mon.knn_k}")
    _require(mon.knn_temperature > 0, "monitor.knn_temperature", "must be > 0")
    _require(
        mon.knn_resize >= 0,
        "monitor.knn_resize",
        f"must be >= 0 pixels (0 = data.global_crop_size × 8/7), got {mon.knn_resize}",
    )
    if mon.knn_every:
        # On the bundled sample (no data.path) the held-out images default to the sample's own val split.
        _require(
            mon.knn_val is not None or d.path is None,
            "monitor.knn_val",
            "set a labelled folder of held-out images to run the k-NN monitor",
        )
        for key in ("knn_train", "knn_val"):
            value = getattr(mon, key)
            if value is not None:
                _require(
                    Path(value).expanduser().is_dir(),
                    f"monitor.{key}",
                    f"{value!r} is not an existing folder",
                )


def _validate_log(lg: LogConfig) -> None:
    _require(
        not lg.wandb or bool(lg.wandb_project),
        "log.wandb_project",
        "name the W&B project to log into (log.wandb_project=NAME) with log.wandb=true",
    )
    _require(lg.images >= 0, "log.images", f"must be >= 0 (0: no images), got {lg.images}")


def as_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.arch": ..., ...}`` for logging."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(as_flat_dict(value, key + "."))
        else:
            out[key] = value
    return out


def _validate_strategy(cfg: DINOConfig) -> None:
    """``run.strategy=fsdp`` combines with what has been tested with it (ViTs, fp32 / bf16, eager)."""
    if cfg.run.strategy != "fsdp":
        return
    arch = cfg.model.arch
    _require(
        arch.startswith("vit_"),
        "run.strategy",
        f"fsdp shards the vit_* backbones (per transformer block), not {arch!r}: use run.strategy=ddp",
    )
    _require(
        cfg.run.precision != "fp16",
        "run.strategy",
        "fsdp trains in bf16 (parameters) with fp32 reductions, or fp32: set run.precision=bf16 or fp32",
    )
    _require(not cfg.run.compile, "run.strategy", "fsdp runs eager: set run.compile=false")
    _require(
        not cfg.monitor.knn_every,
        "run.strategy",
        "with fsdp the teacher is sharded and the online k-NN monitor (first process only) cannot run it: "
        "set monitor.knn_every=0 and evaluate the checkpoints with `dino knn --weights RUN`",
    )
