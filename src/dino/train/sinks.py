"""Where the run logger's records go: ``log.jsonl`` always, TensorBoard and Weights & Biases on request.

Every record the :class:`~dino.train.logger.RunLogger` writes (``start``, ``iter``, ``epoch``, ``knn``,
warnings, ``done``…) goes to each sink through one interface, :class:`Sink`: ``write(record, step)``, where
``step`` is the number of training iterations done so far (every sink's x axis), ``images(tag, pictures,
step)`` for pictures (augmented crops, attention maps) and ``close()``. The JSON-lines file keeps every
record as it is and no pictures; the others turn a record's numbers into scalars named
``<section>/<field>``:

========== ====================================================================
record     scalars
========== ====================================================================
``iter``   ``train/loss``, ``train/teacher_entropy``, ``train/kl``, ``train/images_per_s``, … and the
           schedules ``schedule/lr``, ``schedule/weight_decay``, ``schedule/momentum``,
           ``schedule/teacher_temp``
``epoch``  ``epoch/loss``, ``epoch/images_per_s``, ``epoch/seconds``, … (the epoch's means)
``knn``    ``knn/knn_top1``, ``knn/knn_top5`` (the random-initialisation baseline at step 0)
``start``  none: TensorBoard keeps it as text, W&B in the run's config
others     ``event/<type>/<field>`` for their numbers; TensorBoard also keeps the whole record as text
========== ====================================================================

Only the main process builds sinks. A sink other than the JSON-lines file that fails while the run goes on
(a full disk, a W&B service that went away) is turned off with one warning: watching never stops training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dino.checkpoint import atomic_write_text
from dino.config import ConfigError

if TYPE_CHECKING:
    from dino.config import LogConfig

log = logging.getLogger("dino.train")

SCHEDULE_KEYS = frozenset({"lr", "weight_decay", "momentum", "teacher_temp"})
_NOT_SCALARS = frozenset({"type", "time", "epoch", "iteration"})
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


class Sink(Protocol):
    """One destination of the run's records."""

    def write(self, record: dict[str, Any], step: int) -> None:
        """Keep ``record`` (a JSON-able dict with a ``type``), ``step`` iterations into the run."""

    def images(self, tag: str, pictures: np.ndarray, step: int, caption: str) -> None:
        """Keep ``pictures`` ([N, H, W, 3] uint8 RGB) under ``tag``."""

    def close(self) -> None:
        """Flush and release the destination."""


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``record`` named ``<section>/<field>`` (see the table in the module's docstring)."""
    kind = record.get("type", "event")
    out: dict[str, float] = {}
    if kind == "start":
        return out
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if kind == "iter":
            section = "schedule" if key in SCHEDULE_KEYS else "train"
        elif kind in ("epoch", "knn"):
            section = kind
        else:
            section = f"event/{kind}"
        out[f"{section}/{key}"] = float(value)
    return out


class JsonLinesSink:
    """``log.jsonl``: one JSON object per line, line-buffered (a kill loses at most the line being written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1)  # noqa: SIM115

    def write(self, record: dict[str, Any], step: int) -> None:
        self._file.write(json.dumps(record, default=float) + "\n")

    def images(self, tag: str, pictures: np.ndarray, step: int, caption: str) -> None:
        pass  # the file holds numbers; the pictures go to the sinks that show them

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Event files under ``run_dir/tensorboard/`` (``tensorboard --logdir runs`` shows every run)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, record: dict[str, Any], step: int) -> None:
        for tag, value in scalars_of(record).items():
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, step)
        if record.get("type") not in ("iter", "epoch", "knn"):
            text = json.dumps(record, default=float, indent=1)
            self._writer.add_text(f"event/{record.get('type')}", f"```\n{text}\n```", step)
        if record.get("type") in ("epoch", "knn", "done", "preempted"):
            self._writer.flush()

    def images(self, tag: str, pictures: np.ndarray, step: int, caption: str) -> None:
        self._writer.add_images(tag, pictures, step, dataformats="NHWC")
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A Weights & Biases run. Its id is kept in ``run_dir/wandb_run_id`` so that a run launched again
    continues the same W&B run; its local files go to ``$WANDB_DIR``, else ``run_dir/wandb/``. Every scalar
    is plotted against ``iteration``."""

    def __init__(self, run_dir: Path, log_cfg: LogConfig, config: dict[str, Any]) -> None:
        import wandb

        self._wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = new_wandb_id()
            atomic_write_text(id_file, run_id + "\n")
        folder = Path(os.environ.get("WANDB_DIR") or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=log_cfg.wandb_project,
                entity=log_cfg.wandb_entity,
                name=log_cfg.wandb_name or run_dir.resolve().name,
                id=run_id,
                resume="allow",
                dir=str(folder),
                config=config,
            )
        except Exception as err:  # no login, no network, a project of someone else's…
            raise OSError(
                f"could not start the W&B run {run_id} in project {log_cfg.wandb_project!r} ({type(err).__name__}: "
                f"{err}); check `wandb login` and the network, run with WANDB_MODE=offline (and `wandb sync` "
                "later), or set log.wandb=false"
            ) from err
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    def write(self, record: dict[str, Any], step: int) -> None:
        values: dict[str, Any] = {k: v for k, v in scalars_of(record).items() if math.isfinite(v)}
        if record.get("type") == "start":
            self.run.config.update(
                {f"start/{k}": v for k, v in record.items() if k != "type"}, allow_val_change=True
            )
        if values:
            self.run.log({**values, "iteration": step})

    def images(self, tag: str, pictures: np.ndarray, step: int, caption: str) -> None:
        shown = [self._wandb.Image(p, caption=caption) for p in pictures]
        self.run.log({tag: shown, "iteration": step})

    def close(self) -> None:
        self.run.finish()


def new_wandb_id() -> str:
    """A fresh W&B run id: 8 random lowercase letters and digits (W&B's own ids look alike)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def check_sinks_available(log_cfg: LogConfig) -> None:
    """Refuse, before any work, a sink whose package is not installed, naming the extra to install."""
    wanted = {"tensorboard": ("tensorboard", log_cfg.tensorboard), "wandb": ("wandb", log_cfg.wandb)}
    for key, (module, on) in wanted.items():
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"log.{key}=true needs the {module} package: pip install 'dino[{key}]', or set log.{key}=false"
            )


def build_sinks(cfg: Any, run_dir: Path) -> list[Sink]:
    """The sinks ``cfg.log`` asks for besides ``log.jsonl`` (the main process only). ``cfg``: a run's
    settings with a ``log`` section (:class:`~dino.config.DINOConfig`, a fine-tuning run's)."""
    from dino.config import as_flat_dict

    log_cfg: LogConfig = cfg.log
    check_sinks_available(log_cfg)
    sinks: list[Sink] = []
    if log_cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if log_cfg.wandb:
        sinks.append(WandbSink(run_dir, log_cfg, as_flat_dict(cfg)))
    return sinks
