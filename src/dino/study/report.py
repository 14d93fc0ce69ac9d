"""A study's results from its variants' logs: ``study.json``, ``study.md`` and the figures.

- ``knn.png``: each variant's teacher k-NN accuracy over training against its random initialisation, and
  the final accuracies side by side;
- ``collapse.png``: teacher entropy (between its collapse limits 0 and ln K) and KL(teacher‖student) over
  training, variant by variant, as in the paper's collapse figure (Fig. 7);
- ``teacher_student.png`` (variants with ``monitor.knn_student``): the teacher's and the student's k-NN
  accuracy over training, as in the paper's momentum-teacher figure (Fig. 6, left);
- ``curves.png``: every training curve of every variant overlaid (the runs' own ``curves.png`` panels).

The signature of each variant is read from the mean teacher entropy of its last epoch: at least 95 % of
ln K is a collapse to the uniform output, at most 5 % a collapse onto one dimension (in both cases KL →
0 follows); in between, neither.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dino.checkpoint import atomic_write_text
from dino.study.spec import StudySpec
from dino.train.curves import RunCurves, plot_runs, save_figure

UNIFORM_FRACTION = 0.95  # final entropy at least this fraction of ln K: collapse to the uniform output
ONE_DIM_FRACTION = 0.05  # at most this fraction of ln K: collapse onto one dimension


@dataclass
class VariantResult:
    name: str
    slug: str
    overrides: list[str]
    run_dir: str
    finished: bool
    epochs: int = 0
    images_seen: int = 0
    train_minutes: float | None = None
    knn_top1: float | None = None
    knn_top5: float | None = None
    knn_random_init: float | None = None
    knn_student_top1: float | None = None
    teacher_entropy: float | None = None  # mean over the last epoch
    kl: float | None = None
    ln_k: float | None = None
    signature: str = "not trained yet"


@dataclass
class StudyReport:
    name: str
    title: str
    out_dir: Path
    variants: list[VariantResult]
    files: dict[str, Path] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.name,
            "title": self.title,
            "variants": [asdict(v) for v in self.variants],
            "files": {k: p.name for k, p in self.files.items()},
        }


def collect(spec: StudySpec, out_dir: Path) -> tuple[StudyReport, list[RunCurves]]:
    """The report's table, and the curves of each variant that has a log (each log read once)."""
    from dino.study.runner import is_finished, variant_dir

    results, runs = [], []
    for variant in spec.variants:
        run_dir = variant_dir(out_dir, variant)
        result = VariantResult(
            variant.name, variant.slug, variant.overrides, str(run_dir), is_finished(run_dir)
        )
        if (run_dir / "log.jsonl").is_file():
            curves = RunCurves.read(run_dir, variant.name)
            _fill(result, curves)
            runs.append(curves)
        results.append(result)
    return StudyReport(spec.name, spec.title, out_dir, results), runs


def _fill(result: VariantResult, curves: RunCurves) -> None:
    if curves.epochs:
        last = curves.epochs[-1]
        result.epochs = int(last["epoch"]) + 1
        result.teacher_entropy = _number(last.get("teacher_entropy"))
        result.kl = _number(last.get("kl"))
    done = curves.done or {}
    iterations = _number(done.get("iterations"))
    if iterations is None and curves.iters:  # unfinished: up to the last logged step
        iterations = curves.iters[-1]["iteration"] + 1
    if iterations is not None:
        result.images_seen = int(curves.images_seen(iterations))
    trained = sorted((e, acc) for e, acc in curves.knn if e >= 0)
    if trained:
        result.knn_top1 = trained[-1][1]
    result.knn_random_init = next((acc for e, acc in curves.knn if e < 0), None)
    students = sorted((e, acc) for e, acc in curves.knn_student if e >= 0)
    if students:
        result.knn_student_top1 = students[-1][1]
    result.knn_top5 = curves.knn_top5
    seconds = _number(done.get("train_seconds"))
    result.train_minutes = round(seconds / 60, 2) if seconds is not None else None
    if curves.out_dim:
        result.ln_k = math.log(curves.out_dim)
    result.signature = _signature(result)


def _number(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _signature(r: VariantResult) -> str:
    if r.teacher_entropy is None or r.ln_k is None:
        return "no epoch finished yet"
    fraction = r.teacher_entropy / r.ln_k
    if fraction >= UNIFORM_FRACTION:
        return "collapse: uniform (entropy → ln K)"
    if fraction <= ONE_DIM_FRACTION:
        return "collapse: one dimension (entropy → 0)"
    return "no collapse"


def write_report(spec: StudySpec, out_dir: Path) -> StudyReport:
    """``study.json``, ``study.md`` and the figures in ``out_dir`` from whatever the variants have logged
    (unfinished variants are marked so)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report, runs = collect(spec, out_dir)
    if runs:
        report.files["knn"] = save_figure(knn_figure(runs, report), out_dir / "knn.png")
        report.files["collapse"] = save_figure(collapse_figure(runs, spec.title), out_dir / "collapse.png")
        if any(run.knn_student for run in runs):
            report.files["teacher_student"] = save_figure(
                teacher_student_figure(runs, spec.title), out_dir / "teacher_student.png"
            )
        report.files["curves"] = plot_runs(runs, out_dir / "curves.png", f"{spec.title}: training curves")
    atomic_write_text(out_dir / "study.json", json.dumps(report.to_json(), indent=2) + "\n")
    atomic_write_text(out_dir / "study.md", markdown(spec, report))
    return report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(spec: StudySpec, report: StudyReport) -> str:
    source = (
        spec.source.stem if spec.source is not None and "configs/studies" in str(spec.source) else spec.source
    )
    budget = ", ".join(f"{amount:g} {kind}" for kind, amount in spec.budget.items())
    lines = [
        f"# {spec.title}",
        "",
        spec.description,
        "",
        f"Made by `dino study {shlex.quote(str(source))} --out {shlex.quote(str(report.out_dir))}`; budget per "
        f"variant: {budget}; base configuration: {spec.config or 'the defaults'}"
        + (f" with {' '.join(spec.overrides)}" if spec.overrides else "")
        + ". k-NN: weighted k-NN top-1 (%) of the teacher's backbone on the held-out images of the k-NN "
        "monitor; entropy and KL: means over the last epoch (nats).",
        "",
        "| variant | overrides | epochs | images seen | minutes | k-NN top-1 | random init | student k-NN "
        "| teacher entropy / ln K | KL | signature |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report.variants:
        ratio = (
            _fmt(v.teacher_entropy / v.ln_k, 3)
            if v.teacher_entropy is not None and v.ln_k is not None
            else "–"
        )
        status = v.signature if v.finished else f"{v.signature} (unfinished)"
        lines.append(
            f"| {v.name} | {' '.join(f'`{o}`' for o in v.overrides) or '(base)'} | {v.epochs} | {v.images_seen:,} "
            f"| {_fmt(v.train_minutes, 1)} | {_fmt(v.knn_top1)} | {_fmt(v.knn_random_init)} "
            f"| {_fmt(v.knn_student_top1)} | {ratio} | {_fmt(v.kl, 4)} | {status} |"
        )
    lines.append("")
    for key, caption in (
        ("knn", "k-NN accuracy over training and at the end"),
        ("collapse", "teacher entropy and KL(teacher ‖ student) over training"),
        ("teacher_student", "teacher against student k-NN over training"),
        ("curves", "every training curve"),
    ):
        if key in report.files:
            lines += [f"![{caption}]({report.files[key].name})", ""]
    return "\n".join(lines)


def _axes_grid(n: int, figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(1, n)


def _colours() -> list[str]:
    from matplotlib import rcParams

    return rcParams["axes.prop_cycle"].by_key()["color"]


def knn_figure(runs: list[RunCurves], report: StudyReport):
    """k-NN top-1 over images seen per variant (random init dashed), and the final values as bars."""
    fig, (curve_ax, bar_ax) = _axes_grid(2, (14, 5.5))
    colours = _colours()
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        trained = sorted((e, acc) for e, acc in run.knn if e >= 0)
        if trained:
            xs = [run.images_seen((e + 1) * run.iters_per_epoch) for e, _ in trained]
            curve_ax.plot(xs, [a for _, a in trained], marker="o", color=colour, label=run.name)
        baseline = next((acc for e, acc in run.knn if e < 0), None)
        if baseline is not None:
            curve_ax.axhline(
                baseline, color=colour, linestyle="--", alpha=0.6, label=f"{run.name}: random init"
            )
    names = [v.name for v in report.variants]
    finals = [v.knn_top1 if v.knn_top1 is not None else 0.0 for v in report.variants]
    bars = bar_ax.bar(range(len(names)), finals, color=[colours[i % len(colours)] for i in range(len(names))])
    bar_ax.bar_label(bars, labels=[_fmt(v.knn_top1, 1) for v in report.variants])
    randoms = [(i, v.knn_random_init) for i, v in enumerate(report.variants) if v.knn_random_init is not None]
    if randoms:
        bar_ax.scatter([i for i, _ in randoms], [a for _, a in randoms], color="black", marker="_", s=600,
                       zorder=3, label="random init")  # fmt: skip
        bar_ax.legend(fontsize="small")
    bar_ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    curve_ax.set(title="teacher k-NN top-1 on held-out images", xlabel=runs[0].x_label, ylabel="top-1 (%)")
    bar_ax.set(title="at the end of each variant", xlabel="variant", ylabel="top-1 (%)")
    for ax in (curve_ax, bar_ax):
        ax.grid(alpha=0.3)
    if curve_ax.has_data():
        curve_ax.legend(fontsize="small")
    fig.suptitle(f"{report.title}: k-NN accuracy")
    return fig


def collapse_figure(runs: list[RunCurves], title: str):
    """Teacher entropy (with 0 and ln K) and KL(teacher‖student) over images seen, one line per variant."""
    fig, (entropy_ax, kl_ax) = _axes_grid(2, (14, 5.5))
    colours = _colours()
    ln_ks: set[float] = set()
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        for ax, key in ((entropy_ax, "teacher_entropy"), (kl_ax, "kl")):
            points = [
                (run.images_seen(r["iteration"] + 1), float(r[key]))
                for r in run.iters
                if r.get(key) is not None and math.isfinite(float(r[key]))
            ]
            ax.plot([x for x, _ in points], [y for _, y in points], color=colour, label=run.name)
        if run.out_dim:
            ln_ks.add(math.log(run.out_dim))
    for ln_k in sorted(ln_ks):
        entropy_ax.axhline(ln_k, color="grey", linestyle=":", label=f"ln K = {ln_k:.2f} (uniform output)")
    entropy_ax.axhline(0.0, color="black", linestyle=":", label="0 (one dimension dominates)")
    x_label = runs[0].x_label
    entropy_ax.set(title="teacher entropy h(P_t)", xlabel=x_label, ylabel="entropy (nats)")
    kl_ax.set(title="KL(P_t ‖ P_s) (0: constant output, collapse)", xlabel=x_label, ylabel="KL (nats)")
    for ax in (entropy_ax, kl_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{title}: collapse signatures")
    return fig


def teacher_student_figure(runs: list[RunCurves], title: str):
    """Teacher (solid) and student (dashed) k-NN top-1 over images seen, per variant that scored both."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    colours = _colours()
    for i, run in enumerate(runs):
        if not run.knn_student:
            continue
        colour = colours[i % len(colours)]
        for points, who, style in ((run.knn, "teacher", "-"), (run.knn_student, "student", "--")):
            trained = sorted((e, acc) for e, acc in points if e >= 0)
            xs = [run.images_seen((e + 1) * run.iters_per_epoch) for e, _ in trained]
            ax.plot(
                xs,
                [a for _, a in trained],
                marker="o",
                linestyle=style,
                color=colour,
                label=f"{run.name}: {who}",
            )
    ax.set(
        title=f"{title}: teacher vs student",
        xlabel=runs[0].x_label,
        ylabel="k-NN top-1 on held-out images (%)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
