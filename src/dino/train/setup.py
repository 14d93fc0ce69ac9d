"""Building blocks of a run: models, schedules, random state and the checkpoint payload."""

from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dino.checkpoint import atomic_save
from dino.config import COMPILE_MODES, ConfigError, DINOConfig, config_to_dict
from dino.data.datasets import ImageFolderDataset
from dino.data.sample import sample_dataset
from dino.data.shards import ShardSet
from dino.hub import WeightsError, describe_architecture, infer_architecture, load_backbone_weights
from dino.loss import DINOLoss
from dino.models.backbones import build_backbone
from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropWrapper
from dino.models.vision_transformer import VisionTransformer
from dino.teacher import init_teacher
from dino.train.data import resolve_num_workers
from dino.train.monitors import OnlineKNN
from dino.train.optim import load_state_by_name

if TYPE_CHECKING:
    from dino.train.resume import TrainState

log = logging.getLogger(__name__)


def _backbone(cfg: DINOConfig, drop_path_rate: float) -> tuple[nn.Module, int]:
    m = cfg.model
    return build_backbone(m.arch, m.patch_size, cfg.data.global_crop_size, drop_path_rate, m.depth)


def _head(cfg: DINOConfig, embed_dim: int, student: bool) -> DINOHead:
    """The head; the student's with the predictor when ``head.predictor`` is on (the teacher never has
    one)."""
    h = cfg.head
    predictor_hidden = (h.predictor_hidden_dim or h.hidden_dim) if h.predictor and student else 0
    return DINOHead(
        embed_dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers, h.use_bn, h.norm_last_layer,
        activation=h.activation, l2_bottleneck=h.l2_bottleneck, predictor_hidden_dim=predictor_hidden,
    )  # fmt: skip


def build_student_teacher(cfg: DINOConfig, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (with stochastic depth) and teacher (without), same weights at the start.

    The weights are drawn from ``run.seed`` alone, whatever the random state before, so every process of a
    distributed run builds the same student and teacher (DDP would make the students equal, not the
    teachers); the caller's random streams continue as if this had drawn nothing."""
    with torch.random.fork_rng(devices=[]):  # the CPU stream: modules are built there, then moved
        torch.manual_seed(cfg.run.seed)
        return _build_student_teacher(cfg, device)


def _build_student_teacher(
    cfg: DINOConfig, device: torch.device
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    student_backbone, dim = _backbone(cfg, cfg.model.drop_path_rate)
    if cfg.model.pretrained:
        load_backbone_weights(student_backbone, cfg.model.pretrained)
        log.info("student backbone initialised from %s", cfg.model.pretrained)
    teacher_backbone, _ = _backbone(cfg, 0.0)
    student = MultiCropWrapper(student_backbone, _head(cfg, dim, student=True))
    # The teacher's head never trains, so its last-layer norm is fixed like the student's.
    teacher = MultiCropWrapper(teacher_backbone, _head(cfg, dim, student=False))
    # BatchNorm statistics over the global batch (as the original): SyncBatchNorm runs on GPUs only, so a
    # multi-process CPU run normalises each process's own batch.
    if _has_batch_norm(student) and torch.distributed.is_initialized() and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    if cfg.model.activation_checkpointing:
        assert isinstance(student.backbone, VisionTransformer)  # validate allows it for vit_* only
        student.backbone.activation_checkpointing = True  # the teacher has no backward pass
    memory_format = memory_format_for(student, device)
    student, teacher = student.to(device), teacher.to(device)
    if memory_format is not None:
        student, teacher = student.to(memory_format=memory_format), teacher.to(memory_format=memory_format)
    init_teacher(teacher, student)
    if cfg.run.compile:
        compile_backbones(student, teacher, cfg.run.compile_mode)
    return student, teacher


def check_compile_toolchain(device: torch.device) -> None:
    """Compile and run a one-line function on ``device``, as ``run.compile=true`` will compile the backbones
    at the first step: the C++ compiler (and Python headers) inductor needs on a CPU, Triton on a GPU.
    Called before the data are built, so a missing toolchain stops a run in seconds, not after decoding a
    dataset into memory and starting the first step.

    Raises:
        ConfigError: naming what failed and the way out (``run.compile=false``).
    """

    def probe(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 + 1.0

    import torch._inductor.config as inductor_config

    # Without inductor's caches: a cached kernel would pass without the compiler the backbones need. (The
    # run has started no threads yet, so catch_warnings is safe here; it hides the note that caches off
    # also turns off dynamo's profile-guided shapes, which concerns this probe only.)
    try:
        with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
            out = torch.compile(probe, dynamic=False)(torch.ones(8, device=device))
        ok = bool((out == 3.0).all())
    except Exception as exc:  # noqa: BLE001 - inductor and its compilers raise many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"run.compile=true: torch.compile does not work on {device} here ({first_line}). "
            + (
                "On a CPU it needs a C++ compiler (g++ or clang++; CXX picks one) and the Python headers. "
                if device.type == "cpu"
                else "On a GPU it needs Triton (part of PyTorch's CUDA wheels). "
            )
            + "Install them, or set run.compile=false (the same training, eager)."
        ) from exc
    if not ok:
        raise ConfigError(f"run.compile=true: a compiled test function gave wrong values on {device}")


def uses_cuda_graphs(mode: str) -> bool:
    """Whether ``torch.compile``'s ``mode`` records CUDA graphs (on CUDA devices)."""
    return mode in ("reduce-overhead", "max-autotune")


def compile_backbones(student: MultiCropWrapper, teacher: MultiCropWrapper, mode: str = "default") -> None:
    """``torch.compile`` the student's and the teacher's backbones with static shapes: one graph per crop
    resolution (the student's global and local, the teacher's global), no dynamic-shape kernels, no
    recompilation after the first step. The heads and the loss stay eager. With a CUDA-graph ``mode`` the
    caller marks each training step's start (``torch.compiler.cudagraph_mark_step_begin``)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    student.backbone = _compiled(student.backbone, mode)
    teacher.backbone = _compiled(teacher.backbone, mode)


def _compiled(module: nn.Module, mode: str) -> nn.Module:
    compiled = torch.compile(module, dynamic=False, mode=mode)
    assert isinstance(compiled, nn.Module)  # an OptimizedModule around ``module``
    return compiled


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module itself, under its ``torch.compile`` wrapper if it has one."""
    return getattr(module, "_orig_mod", module)


def memory_format_for(model: nn.Module, device: torch.device) -> torch.memory_format | None:
    """Channels-last for convolutional networks, whose convolutions run fastest that way on GPUs and on
    CPUs alike (oneDNN; see benchmarks/README.md); None (leave as is) for the others — a ViT's only
    convolution is its patch embedding. ``device`` is where the model runs (MPS keeps the default)."""
    convolutional = sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1
    return torch.channels_last if device.type in ("cuda", "cpu") and convolutional else None


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def capture_rng() -> dict[str, Any]:
    """Random streams of this process (plain data, so the checkpoint loads with weights_only)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def gather_process_rng(world_size: int) -> dict[str, Any] | list[dict[str, Any]]:
    """This process's random streams (one process), or every process's, in rank order (a collective:
    every process calls it). Each process draws its own stream (seeded run.seed + rank), so a checkpoint
    keeps them all for the run to continue exactly."""
    rng = capture_rng()
    if world_size == 1:
        return rng
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, rng)
    return gathered


def restore_process_rng(rng: dict[str, Any] | list[dict[str, Any]], rank: int, world_size: int) -> bool:
    """Put back this process's streams from a checkpoint's ``rng`` (see :func:`gather_process_rng`);
    False when it holds no state for this process (saved with another number of processes), in which
    case the streams stay as seeded."""
    per_process = rng if isinstance(rng, list) else [rng]
    if len(per_process) != world_size:
        return False
    restore_rng(per_process[rank])
    return True


def model_state_dict(model: MultiCropWrapper) -> dict[str, torch.Tensor]:
    """``backbone.*`` / ``head.*`` keys, whether or not the backbone was compiled."""
    state = {f"backbone.{k}": v for k, v in unwrap_compiled(model.backbone).state_dict().items()}
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    return state


def model_parameters(model: MultiCropWrapper) -> dict[str, nn.Parameter]:
    """The parameters under their ``backbone.*`` / ``head.*`` names, whether or not the backbone was
    compiled (the names of :func:`model_state_dict`)."""
    params = {f"backbone.{k}": v for k, v in unwrap_compiled(model.backbone).named_parameters()}
    params.update({f"head.{k}": v for k, v in model.head.named_parameters()})
    return params


def check_architecture(model: MultiCropWrapper, state: dict[str, torch.Tensor], origin: str | Path) -> None:
    """Refuse to continue from ``state`` (``backbone.*`` / ``head.*``) when its tensors are not those of
    ``model``: one error naming both architectures, not PyTorch's list of every mismatched tensor."""
    own = model_state_dict(model)
    differing = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
    if not differing:
        return
    key = differing[0]

    def shape(tensors: dict[str, torch.Tensor]) -> str:
        return str(tuple(tensors[key].shape)) if key in tensors else "absent"

    raise ConfigError(
        f"{origin} holds a {describe_model_state(state)} but the configuration builds a "
        f"{describe_model_state(own)} ({key}: checkpoint {shape(state)}, model {shape(own)}): set model.*, "
        "head.* and data.global_crop_size as the checkpoint has them (`dino train --resume` takes a released "
        "checkpoint's own when the command line does not set them), or resume from a checkpoint of this "
        "architecture"
    )


def describe_model_state(state: dict[str, torch.Tensor]) -> str:
    """``vit_small/16 (224 px, 12 blocks) with a 3-layer head to K = 65536`` for a ``backbone.*`` /
    ``head.*`` state dict."""
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    try:
        arch = describe_architecture(*infer_architecture(backbone))
    except WeightsError:
        arch = "backbone"
    linears = [
        k for k, v in state.items() if k.startswith("head.mlp") and k.endswith(".weight") and v.ndim == 2
    ]
    last = state.get("head.last_layer.weight_v")
    head = f"{len(linears)}-layer head to K = {last.shape[0]}" if last is not None else "head of another kind"
    return f"{arch} with a {head}"


def load_released_optimizer(
    optimizer: torch.optim.Optimizer, name: str, model: MultiCropWrapper, released: dict[str, Any]
) -> None:
    """Continue with the optimiser state of a released full checkpoint of the original code (see
    :func:`dino.hub.checkpoints.released_optimizer_state`), matched to ``model``'s parameters by name."""
    if released["name"] != name:
        log.warning(
            "the checkpoint's optimiser is %s but optim.name=%s: its state is not carried over (the first "
            "updates differ from the original's)",
            released["name"], name,
        )  # fmt: skip
        return
    unused = load_state_by_name(optimizer, model_parameters(model), released["state"])
    if unused:
        log.warning(
            "the checkpoint's optimiser holds state for %s, which this run does not train: dropped",
            ", ".join(unused),
        )


def load_model_state_dict(model: MultiCropWrapper, state: dict[str, torch.Tensor]) -> None:
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    unwrap_compiled(model.backbone).load_state_dict(backbone)
    model.head.load_state_dict(head)


def run_state_dict(
    cfg: DINOConfig,
    student: MultiCropWrapper,
    teacher: MultiCropWrapper,
    optimizer: torch.optim.Optimizer,
    dino_loss: DINOLoss,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    global_batch_size: int,
    rng: dict[str, Any] | list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything needed to continue exactly; key names follow the released DINO checkpoints. ``rng``:
    from :func:`gather_process_rng`; ``global_batch_size`` (images per step over all processes) lets a
    run resumed with another batch size continue mid-epoch after the same number of images."""
    return {
        "student": model_state_dict(student),
        "teacher": model_state_dict(teacher),
        "optimizer": optimizer.state_dict(),
        **run_extras(cfg, dino_loss, scaler, state, global_batch_size, rng),
    }


def run_extras(
    cfg: DINOConfig,
    dino_loss: DINOLoss,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    global_batch_size: int,
    rng: dict[str, Any] | list[dict[str, Any]],
) -> dict[str, Any]:
    """What a checkpoint holds besides the models and the optimiser (see :func:`run_state_dict`): all a
    sharded checkpoint keeps beside its shards."""
    return {
        "dino_loss": dino_loss.state_dict(),
        "fp16_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": state.epoch,
        "iteration": state.iteration,
        "step_in_epoch": state.step_in_epoch,
        "train_seconds": state.train_seconds,
        "global_batch_size": global_batch_size,
        "rng": rng,
        "config": config_to_dict(cfg),
    }


def save_backbone(backbone: nn.Module, path: Path) -> None:
    """Backbone weights alone, in the released key layout (``torch.load`` + ``load_state_dict`` strict)."""
    save_backbone_state(unwrap_compiled(backbone).state_dict(), path)


def save_backbone_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """A backbone's state dict (e.g. gathered from shards) written as :func:`save_backbone` writes one."""
    atomic_save({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)


def build_knn_monitor(cfg: DINOConfig, train_dataset: ImageFolderDataset | ShardSet) -> OnlineKNN | None:
    mon = cfg.monitor
    if not mon.knn_every:
        return None
    bank = mon.knn_train or str(train_dataset.root)  # build_train_data checked that it is labelled
    # Training on the bundled sample, its held-out split is the default (validate() allows no other gap).
    val = mon.knn_val if mon.knn_val is not None else str(sample_dataset("val"))
    crop = cfg.data.global_crop_size
    resize = mon.knn_resize or int(round(crop * 8 / 7))
    # The training run's loader workers also decode the monitor's images: in the main process, a pass over
    # a CIFAR-sized bank can take longer than a GPU epoch.
    return OnlineKNN(
        bank,
        val,
        crop,
        resize,
        cfg.data.mean,
        cfg.data.std,
        mon.knn_k,
        mon.knn_temperature,
        batch_size=256,
        num_workers=resolve_num_workers(cfg.data.num_workers),
    )
