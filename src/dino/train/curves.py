"""The picture of a run: training curves read from ``log.jsonl``, one run or several overlaid.

Nine panels, each readable on its own: the loss; the teacher's entropy between its two collapse limits
(0: one dimension dominates, ln K: uniform output); KL(teacher‖student), which falls to 0 when nothing is
learned; the online k-NN accuracy against the network's own accuracy at random initialisation; the
schedules (learning rate, weight decay, teacher temperature, teacher momentum); the training speed in
images per second. The x axis is the number of images seen, so runs with different
batch sizes line up. Drawn with matplotlib's Agg renderer (no display needed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino.checkpoint import write_atomically


@dataclass
class RunCurves:
    """What the plot needs from one run's ``log.jsonl``."""

    name: str
    out_dim: int | None = None
    images_per_iter: int = 0
    iters_per_epoch: int = 0
    iters: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    knn: list[tuple[int, float]] = field(default_factory=list)  # (epoch, top-1); epoch -1: random init
    knn_student: list[tuple[int, float]] = field(default_factory=list)  # the student's (monitor.knn_student)
    knn_top5: float | None = None  # the teacher's last top-5
    done: dict[str, Any] | None = None  # the last ``done`` record: the run finished

    @classmethod
    def read(cls, run_dir: str | Path, name: str | None = None) -> RunCurves:
        run_dir = Path(run_dir)
        log = run_dir / "log.jsonl" if run_dir.is_dir() else run_dir
        if not log.is_file():
            raise FileNotFoundError(f"{log} does not exist: give a run directory that holds a log.jsonl")
        curves = cls(name or (run_dir.name if run_dir.is_dir() else run_dir.parent.name))
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill: the rest is still worth a picture
                continue
            kind = record.get("type")
            if kind == "start":
                curves.iters_per_epoch = int(record.get("iters_per_epoch", 0))
                curves.out_dim = record.get("out_dim", curves.out_dim)
                curves.images_per_iter = int(record.get("global_batch_size", curves.images_per_iter))
            elif kind == "iter":
                curves.iters.append(record)
            elif kind == "epoch":
                curves.epochs.append(record)
            elif kind == "knn" and record.get("knn_top1") is not None:
                curves.knn.append((int(record["epoch"]), float(record["knn_top1"])))
                if record.get("knn_student_top1") is not None:
                    curves.knn_student.append((int(record["epoch"]), float(record["knn_student_top1"])))
                if record.get("knn_top5") is not None:
                    curves.knn_top5 = float(record["knn_top5"])
            elif kind == "done":
                curves.done = record
        return curves

    def images_seen(self, iteration: float) -> float:
        return iteration * self.images_per_iter if self.images_per_iter else iteration

    @property
    def x_label(self) -> str:
        return "images seen" if self.images_per_iter else "iteration"


def _finite(points: list[tuple[float, Any]]) -> tuple[list[float], list[float]]:
    kept = [(x, float(y)) for x, y in points if y is not None and math.isfinite(float(y))]
    return [x for x, _ in kept], [y for _, y in kept]


def plot_runs(runs: list[RunCurves], out: str | Path, title: str | None = None) -> Path:
    """Draw ``runs`` into one PNG at ``out`` (written atomically: a reader never sees half a file)."""
    return save_figure(curves_figure(runs, title), out)


def save_figure(fig: Any, out: str | Path) -> Path:
    """Write a matplotlib figure as a PNG at ``out`` atomically (a temporary file, then a rename)."""
    out = Path(out)
    write_atomically(out, lambda fh: fig.savefig(fh, dpi=90, format="png"))
    return out


def curves_figure(runs: list[RunCurves], title: str | None = None):
    """The matplotlib figure of :func:`plot_runs` (3 × 3 panels). A bare ``Figure``, not pyplot's: no
    global state, no window, nothing to close; it renders with Agg."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 12), layout="constrained")
    axes = fig.subplots(3, 3)
    loss_ax, entropy_ax, kl_ax, knn_ax, lr_ax, wd_ax, temp_ax, momentum_ax, speed_ax = axes.flat
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    x_label = runs[0].x_label if runs else "iteration"
    ln_k_drawn: set[float] = set()
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]

        def series(key: str, r: RunCurves = run) -> tuple[list[float], list[float]]:
            return _finite([(r.images_seen(rec["iteration"] + 1), rec.get(key)) for rec in r.iters])

        loss_ax.plot(*series("loss"), color=colour, label=run.name)
        entropy_ax.plot(*series("teacher_entropy"), color=colour, label=run.name)
        if run.out_dim and math.log(run.out_dim) not in ln_k_drawn:
            ln_k = math.log(run.out_dim)
            ln_k_drawn.add(ln_k)
            entropy_ax.axhline(ln_k, color=colour, linestyle=":", label=f"ln K = {ln_k:.2f} (uniform)")
        kl_ax.plot(*series("kl"), color=colour, label=run.name)
        lr_ax.plot(*series("lr"), color=colour, label=run.name)
        wd_ax.plot(*series("weight_decay"), color=colour, label=run.name)
        temp_ax.plot(*series("teacher_temp"), color=colour, label=run.name)
        momentum_ax.plot(*series("momentum"), color=colour, label=run.name)
        speed_ax.plot(*series("images_per_s"), color=colour, label=run.name)
        _plot_knn(knn_ax, run, colour)
    entropy_ax.axhline(0.0, color="black", linestyle=":", label="0 (one dimension)")
    _label_panels(axes.flat, x_label)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    names = ", ".join(run.name for run in runs)
    fig.suptitle(title or f"DINO training curves: {names}")
    return fig


def _plot_knn(ax, run: RunCurves, colour: str) -> None:
    """The teacher's k-NN accuracy at epoch ends (the student's too where it was scored), and the random
    initialisation's as a dashed line."""
    for points, who, style in ((run.knn, "teacher", "-"), (run.knn_student, "student", "--")):
        trained = sorted((e, acc) for e, acc in points if e >= 0)
        if trained:
            xs = [run.images_seen((e + 1) * run.iters_per_epoch) for e, _ in trained]
            accs = [acc for _, acc in trained]
            ax.plot(xs, accs, marker="o", linestyle=style, color=colour, label=f"{run.name}: {who}")
    baseline = [acc for e, acc in run.knn if e < 0]
    if baseline:
        ax.axhline(baseline[0], color=colour, linestyle="--", label=f"{run.name}: random init")


def _label_panels(axes, x_label: str) -> None:
    """Titles, axis labels, grid and legend of the nine panels (in :func:`curves_figure`'s order); a panel
    with nothing logged yet says so."""
    titles = (
        ("DINO loss (cross-entropy)", "loss (nats)"),
        ("teacher entropy (collapse: 0 or ln K)", "entropy (nats)"),
        ("KL(teacher ‖ student) (0: nothing learned)", "KL (nats)"),
        ("weighted k-NN on held-out images", "top-1 accuracy (%)"),
        ("learning rate", "learning rate"),
        ("weight decay", "weight decay"),
        ("teacher temperature", "temperature"),
        ("teacher momentum (EMA rate)", "momentum"),
        ("training speed", "images / s"),
    )
    for ax, (panel_title, y_label) in zip(axes, titles, strict=True):
        ax.set_title(panel_title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes)


def write_run_curves(run_dir: str | Path) -> Path:
    """``run_dir/curves.png`` from ``run_dir/log.jsonl``."""
    run_dir = Path(run_dir)
    return plot_runs([RunCurves.read(run_dir)], run_dir / "curves.png")


def knn_summary(run_dir: str | Path) -> str | None:
    """``"k-NN top-1 X % (random init Y %)"``: the run's last online k-NN accuracy next to the same
    network's at random initialisation; None when the run has no k-NN monitor."""
    knn = dict(RunCurves.read(run_dir).knn)
    trained = [e for e in knn if e >= 0]
    if not trained:
        return None
    baseline = f" (random init {knn[-1]:.2f} %)" if -1 in knn else ""
    return f"k-NN top-1 {knn[max(trained)]:.2f} %{baseline}"
