"""``dino``'s own behaviour: errors as one line (the traceback with -v), skipped files as one log line."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import shutil

import pytest

import dino
import dino.cli
from dino.checkpoint import CheckpointError
from dino.cli import main
from dino.data.datasets import ImageDecodeError
from dino.data.in_memory import InMemoryTooLarge
from dino.data.sample import sample_dataset
from dino.train.guard import TrainingDiverged


def _project_errors() -> list[type[Exception]]:
    """Every exception class the dino package defines (warnings aside), found by importing each module."""
    found = []
    for info in pkgutil.walk_packages(dino.__path__, "dino."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and not issubclass(obj, Warning) and obj.__module__ == info.name:
                found.append(obj)
    return found


def test_every_error_class_of_the_project_is_reported_in_one_line():
    errors = _project_errors()
    assert {CheckpointError, TrainingDiverged, InMemoryTooLarge, ImageDecodeError} <= set(errors)
    assert [e for e in errors if not issubclass(e, dino.cli._REPORTED_ERRORS)] == []


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CheckpointError("checkpoint.pth is truncated; resume from an older one"), 1),
        (TrainingDiverged("the loss was not finite for 20 steps; lower optim.lr"), 1),
        (InMemoryTooLarge("the images need 9 GiB; set data.in_memory=false"), 1),
        (PermissionError(13, "Permission denied", "/runs/x"), 1),
        (FileNotFoundError("image folder /x does not exist"), 2),
    ],
)
def test_errors_end_in_one_line_and_the_traceback_only_with_verbose(
    error, code, tmp_path, monkeypatch, capsys
):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("dino.train.loop.train", fail)
    argv = ["train", "--output", str(tmp_path / "run")]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.splitlines() == [f"dino: error: {error}"]
    assert main([*argv, "-v"]) == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == f"dino: error: {error}"


def test_ctrl_c_before_training_starts_ends_in_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):  # e.g. while the folder is scanned or decoded into memory
        raise KeyboardInterrupt

    monkeypatch.setattr("dino.train.loop.train", interrupted)
    assert main(["train", "--output", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.splitlines() == ["dino: interrupted"]


def test_a_skipped_file_costs_one_log_line(tmp_path, caplog):
    source = sample_dataset("val")
    for name in ("airplane", "bird"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for image in sorted((source / name).iterdir())[:3]:
            shutil.copy(image, tmp_path / "train" / name / image.name)
    shutil.copytree(tmp_path / "train", tmp_path / "test")
    (tmp_path / "train" / "bird" / "broken.png").write_bytes(b"not an image")
    model = ["--random-init", "--arch", "vit_tiny", "--patch-size", "8", "--depth", "1", "--crop-size", "32"]
    with caplog.at_level(logging.WARNING):
        code = main(
            ["knn", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--ks", "1",
             "--device", "cpu", "--num-workers", "0", *model]
        )  # fmt: skip
    assert code == 0
    lines = [r for r in caplog.records if "broken.png" in r.getMessage()]
    assert len(lines) == 1
    message = lines[0].getMessage()
    assert lines[0].name == "dino.data" and "\n" not in message
    assert message.startswith(f"skipping {tmp_path / 'train' / 'bird' / 'broken.png'}: ")
    assert "SkippedImageWarning" not in message


def _stderr_of_refusal(argv, capsys) -> str:
    """The one-line error of a command line refused before any work (argparse exits with 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A file where a folder is asked for, a folder where a file is asked for, a path under a file: refused
    when the command line is read, every command, instead of a traceback once the work is done."""
    file, folder = tmp_path / "file", tmp_path / "folder"
    file.write_text("")
    folder.mkdir()
    model = ["--weights", "unused.pth"]
    cases = [
        (["train", "--output", file], "--output: " + f"{file} is an existing file"),
        (["knn", "--train", folder, "--test", folder, *model, "--output", folder], f"{folder} is a folder"),
        (["knn", "--train", folder, "--test", folder, *model, "--output", file / "r.json"], "lies under"),
        (["extract", folder, *model, "--out", folder], "--out: "),
        (["attention", folder, *model, "--output-dir", file], "--output-dir: "),
        (["attention", folder, "--video", *model, "--animation", folder], "--animation: "),
        (["videoseg", "--data", folder, *model, "--output-dir", file], "--output-dir: "),
        (["retrieval", "--data", folder, *model, "--output", folder], "--output: "),
        (["copydetect", "--data", folder, *model, "--output", folder], "--output: "),
        (["export", "dino_vits16", "--output", file / "x.pth"], "lies under"),
    ]
    for argv, expected in cases:
        assert expected in _stderr_of_refusal([str(a) for a in argv], capsys), argv
    # A run directory set in the configuration is checked too, before any data is read.
    monkeypatch.setattr("dino.train.loop.train", lambda *a, **k: pytest.fail("training started"))
    assert main(["train", f"run.output_dir={file}"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dino: configuration error: run.output_dir: {file} is an existing file; give a folder (new or "
        "existing) instead"
    ]
