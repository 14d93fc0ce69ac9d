"""The run's picture (curves.png) and its one-line k-NN summary."""

from __future__ import annotations

import json
import math

import pytest

from dino.cli import main
from dino.config import load_config
from dino.data.sample import sample_dataset
from dino.train.curves import RunCurves, curves_figure, knn_summary, plot_runs
from dino.train.setup import build_knn_monitor

from .conftest import TINY_OVERRIDES


def _write_log(run_dir, out_dim=64, batch=32, knn=((-1, 20.0), (0, 25.0), (1, 31.5))):
    run_dir.mkdir(parents=True)
    lines = [{"type": "start", "iters_per_epoch": 4, "out_dim": out_dim, "global_batch_size": batch}]
    for it in range(8):
        lines.append({"type": "iter", "epoch": it // 4, "iteration": it, "loss": 4.0 - it * 0.1,
                      "teacher_entropy": 3.0 - it * 0.2, "kl": 0.5, "lr": 1e-3, "teacher_temp": 0.04})  # fmt: skip
    lines += [{"type": "knn", "epoch": e, "knn_top1": acc} for e, acc in knn]
    (run_dir / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{torn")
    return run_dir


def test_the_figure_says_what_it_shows(tmp_path):
    a = RunCurves.read(_write_log(tmp_path / "a"))
    b = RunCurves.read(_write_log(tmp_path / "b", out_dim=128, batch=64))
    assert a.images_seen(4) == 128 and b.images_seen(4) == 256  # x axis: images, whatever the batch
    fig = curves_figure([a, b])
    axes = fig.axes
    titles = [ax.get_title() for ax in axes]
    assert any("entropy" in t for t in titles) and any("KL" in t for t in titles)
    assert any("k-NN" in t for t in titles) and any("learning rate" in t for t in titles)
    assert any("temperature" in t for t in titles) and any("loss" in t for t in titles)
    for ax in axes:
        assert ax.get_xlabel() == "images seen" and ax.get_ylabel()
        assert ax.get_legend() is not None
    entropy = next(ax for ax in axes if "teacher entropy" in ax.get_title())
    labels = [t.get_text() for t in entropy.get_legend().get_texts()]
    # the two collapse limits: 0 and ln K of each run's K
    assert (
        f"ln K = {math.log(64):.2f} (uniform)" in labels and f"ln K = {math.log(128):.2f} (uniform)" in labels
    )
    assert "0 (one dimension)" in labels
    knn = next(ax for ax in axes if "k-NN" in ax.get_title())
    labels = [t.get_text() for t in knn.get_legend().get_texts()]
    assert labels == ["a: teacher", "a: random init", "b: teacher", "b: random init"]
    teacher_line = knn.get_lines()[0]
    assert list(teacher_line.get_xdata()) == [4 * 32, 8 * 32]  # after epochs 0 and 1
    assert list(teacher_line.get_ydata()) == [25.0, 31.5]
    assert "a, b" in fig._suptitle.get_text()
    out = plot_runs([a, b], tmp_path / "both.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_knn_summary_line(tmp_path):
    assert knn_summary(_write_log(tmp_path / "a")) == "k-NN top-1 31.50 % (random init 20.00 %)"
    assert knn_summary(_write_log(tmp_path / "b", knn=((0, 25.0),))) == "k-NN top-1 25.00 %"
    assert knn_summary(_write_log(tmp_path / "c", knn=())) is None
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        RunCurves.read(tmp_path / "missing")


def test_the_bundled_sample_monitors_its_own_held_out_split():
    cfg = load_config("cifar_small")
    assert cfg.data.path is None and cfg.monitor.knn_every == 1 and cfg.monitor.knn_val is None

    class Sample:
        root = sample_dataset("train")

    monitor = build_knn_monitor(cfg, Sample())
    assert monitor.val.root == sample_dataset("val") and monitor.train.root == sample_dataset("train")


@pytest.mark.slow
def test_a_short_run_draws_its_curves_and_prints_the_knn_line(small_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(small_folder), "--output", str(out), *TINY_OVERRIDES, "run.epochs=2",
            "monitor.knn_every=1", f"monitor.knn_val={small_folder}"]  # fmt: skip
    assert main(args) == 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = RunCurves.read(out)
    assert [e for e, _ in runs.knn] == [-1, 0, 1] and runs.out_dim == 128 and runs.images_per_iter == 16
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"k-NN top-1 {runs.knn[-1][1]:.2f} % (random init {runs.knn[0][1]:.2f} %)"


def test_dino_plot_overlays_two_runs_with_one_legend_entry_each(tmp_path, capsys):
    a, b = _write_log(tmp_path / "a"), _write_log(tmp_path / "b", batch=64)
    # images/s and the schedules, as the logger writes them, so that every panel has a line per run
    for run, speed in ((a, 100.0), (b, 250.0)):
        lines = run.joinpath("log.jsonl").read_text().splitlines()[:-1]  # without the torn line
        records = [json.loads(line) for line in lines]
        for r in records:
            if r["type"] == "iter":
                r.update(images_per_s=speed, weight_decay=0.04, momentum=0.996)
        run.joinpath("log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "both.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 run(s)" in capsys.readouterr().out
    fig = curves_figure([RunCurves.read(a), RunCurves.read(b)])
    by_title = {ax.get_title(): ax for ax in fig.axes}
    for title in (
        "DINO loss (cross-entropy)",
        "training speed",
        "weight decay",
        "teacher momentum (EMA rate)",
    ):
        legend = [t.get_text() for t in by_title[title].get_legend().get_texts()]
        assert legend == ["a", "b"], title
    speed = by_title["training speed"]
    assert [set(line.get_ydata()) for line in speed.get_lines()] == [{100.0}, {250.0}]
    assert speed.get_ylabel() == "images / s"


@pytest.mark.slow
def test_dino_plot_of_two_short_runs(small_folder, tmp_path, capsys):
    base = ["train", "--data", str(small_folder), *TINY_OVERRIDES, "run.epochs=1"]
    assert main([*base, "--output", str(tmp_path / "lr_low"), "optim.lr=0.001"]) == 0
    assert main([*base, "--output", str(tmp_path / "lr_high"), "optim.lr=0.01"]) == 0
    out = tmp_path / "compare.png"
    assert main(["plot", str(tmp_path / "lr_low"), str(tmp_path / "lr_high"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = [RunCurves.read(tmp_path / "lr_low"), RunCurves.read(tmp_path / "lr_high")]
    fig = curves_figure(runs)  # the figure dino plot drew
    loss = next(ax for ax in fig.axes if ax.get_title() == "DINO loss (cross-entropy)")
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["lr_low", "lr_high"]
    low, high = (line.get_ydata() for line in loss.get_lines())
    assert list(low) == [r["loss"] for r in runs[0].iters] and len(low) == len(high) == 3  # 48 images / 16


def test_dino_plot_refuses_what_it_cannot_draw(tmp_path, capsys):
    a = _write_log(tmp_path / "a")
    assert main(["plot", str(a), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "ending in .png" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "log.jsonl" in capsys.readouterr().err
    same = _write_log(tmp_path / "other" / "a")
    assert main(["plot", str(a), str(same), "--out", str(tmp_path / "x.png")]) == 2
    assert "--name" in capsys.readouterr().err
    assert (
        main(
            [
                "plot",
                str(a),
                str(same),
                "--name",
                "first",
                "--name",
                "second",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 0
    )
