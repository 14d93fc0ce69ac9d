"""Train a study's variants, one after the other on one device or several at once, one per device.

Each variant is an ordinary run in ``OUT/variants/<slug>/`` (its own ``log.jsonl``, checkpoints,
``curves.png``). A variant whose log ends with its ``done`` record is finished and never trained again; one
that stopped half-way (a kill, Ctrl-C, a preemption) continues from its newest checkpoint. So running the
same study again picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from dino.study.report import StudyReport, write_report
from dino.study.spec import StudyError, StudySpec, Variant

log = logging.getLogger("dino.study")


def variant_dir(out_dir: Path, variant: Variant) -> Path:
    return out_dir / "variants" / variant.slug


def is_finished(run_dir: Path) -> bool:
    """The run's log ends with a ``done`` record after its last ``start``, and its teacher is saved."""
    log_file = run_dir / "log.jsonl"
    if not log_file.is_file() or not (run_dir / "teacher_backbone.pth").is_file():
        return False
    last = None
    for line in log_file.read_text().splitlines():
        try:
            kind = json.loads(line).get("type")
        except (json.JSONDecodeError, AttributeError):
            continue
        if kind in ("start", "done"):
            last = kind
    return last == "done"


def run_study(
    spec: StudySpec,
    out_dir: str | Path,
    extra: Sequence[str] = (),
    only: Sequence[str] = (),
    devices: Sequence[str] = (),
) -> StudyReport:
    """Train the variants of ``spec`` that are not finished (``only``: those named), then write the report.

    ``extra``: dotted overrides for every variant (``run.device=cuda:1``). ``devices``: with two or more,
    the variants run at once, one process per device (``run.device`` set to it), at most one per device;
    otherwise one after the other in this process.
    """
    out_dir = Path(out_dir).expanduser()
    train_variants(spec, out_dir, extra, only, devices)
    return write_report(spec, out_dir)


def train_variants(
    spec: StudySpec,
    out_dir: Path,
    extra: Sequence[str] = (),
    only: Sequence[str] = (),
    devices: Sequence[str] = (),
) -> None:
    """:func:`run_study` without the report."""
    _claim(out_dir, spec)
    chosen = [spec.variant(name) for name in only] if only else list(spec.variants)
    pending = [v for v in chosen if not is_finished(variant_dir(out_dir, v))]
    for v in chosen:
        if v not in pending:
            log.info("variant %r: finished earlier (%s), not trained again", v.name, variant_dir(out_dir, v))
    if len(devices) > 1 and len(pending) > 1:
        _run_in_processes(spec, out_dir, pending, list(extra), list(devices))
    else:
        for v in pending:
            _train_variant(spec, out_dir, v, [*extra, *([f"run.device={devices[0]}"] if devices else [])])


def _claim(out_dir: Path, spec: StudySpec) -> None:
    """Make ``out_dir`` this study's, with a copy of the study file in it. A study file edited since may add
    variants, or change titles and descriptions; what would make the finished variants incomparable with
    new ones (the base configuration, the common overrides, the budget, a variant's own overrides) is
    refused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = out_dir / "study.yaml"
    if saved.is_file():
        earlier = yaml.safe_load(saved.read_text()) or {}
        changed = [key for key in ("config", "overrides", "budget") if earlier.get(key) != spec.raw.get(key)]
        before = earlier.get("variants") or {}
        changed += [
            f"variant {name!r}" for name, overrides in before.items()
            if name in spec.raw["variants"] and spec.raw["variants"][name] != overrides
        ]  # fmt: skip
        if changed:
            raise StudyError(
                f"{out_dir} holds another study, or this one with {', '.join(changed)} changed since "
                f"(see {saved}): its finished variants would not compare with new ones; give another --out, or "
                "delete that folder to start afresh"
            )
    tmp = saved.with_name(f".study.yaml.{os.getpid()}.tmp")  # the per-device workers claim it at once
    if spec.source is not None:
        shutil.copyfile(spec.source, tmp)
    else:
        tmp.write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    tmp.replace(saved)


def _train_variant(spec: StudySpec, out_dir: Path, variant: Variant, extra: list[str]) -> None:
    from dino.train import loop

    run_dir = variant_dir(out_dir, variant)
    cfg = spec.variant_config(variant, run_dir, extra)
    log.info("variant %r: training in %s", variant.name, run_dir)
    start = time.monotonic()
    loop.train(cfg, resume=True)
    log.info("variant %r: done in %.1f min", variant.name, (time.monotonic() - start) / 60)


def _run_in_processes(
    spec: StudySpec, out_dir: Path, pending: list[Variant], extra: list[str], devices: list[str]
) -> None:
    """One ``dino study … --only SLUG run.device=DEV`` process per variant, at most one per entry of
    ``devices`` (a device named twice runs two variants at once: ``cpu,cpu`` on a CPU with cores to spare)."""
    assert spec.source is not None
    queue = list(pending)
    env = _child_environment(devices)
    running: dict[int, tuple[subprocess.Popen, Variant]] = {}
    failed: list[str] = []
    while queue or running:
        for slot, device in enumerate(devices):
            if slot not in running and queue:
                v = queue.pop(0)
                command = [
                    sys.executable, "-m", "dino.cli", "study", str(spec.source), "--out", str(out_dir),
                    "--only", v.slug, "--no-report", *extra, f"run.device={device}",
                ]  # fmt: skip
                log.info("variant %r on %s: %s", v.name, device, " ".join(command))
                running[slot] = (subprocess.Popen(command, env=env.get(device)), v)
        time.sleep(1.0)
        for slot, (process, v) in list(running.items()):
            if process.poll() is not None:
                del running[slot]
                if process.returncode != 0:
                    failed.append(f"{v.name!r} (exit {process.returncode}, on {devices[slot]})")
    if failed:
        raise StudyError(
            f"variants failed: {', '.join(failed)}; their errors are above. Run the study again to continue: "
            "finished variants are kept"
        )


def _child_environment(devices: list[str]) -> dict[str, dict[str, str]]:
    """The environment of the processes that train on the CPU: the machine's cores split between the CPU
    slots (``OMP_NUM_THREADS``), so that ``cpu,cpu`` on two cores runs two one-thread trainings rather
    than two two-thread ones fighting over the cores. A user's own ``OMP_NUM_THREADS`` is kept."""
    cpu_slots = sum(1 for d in devices if d == "cpu")
    if not cpu_slots or "OMP_NUM_THREADS" in os.environ:
        return {}
    threads = max(1, (os.cpu_count() or 1) // cpu_slots)
    return {"cpu": {**os.environ, "OMP_NUM_THREADS": str(threads)}}
