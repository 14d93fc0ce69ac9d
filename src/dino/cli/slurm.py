"""``dino slurm``: submit ``dino train`` as a SLURM job with submitit (the optional extra ``[slurm]``).

The job runs one task per GPU (``--gpus-per-node`` tasks on each of ``--nodes`` nodes), each task a
``dino train`` process with the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) that submitit derives from SLURM's. Before the time limit, or when the job
is preempted, SLURM sends submitit's warning signal (SIGUSR2, ``--signal=USR2@<delay>``): the training saves
a checkpoint and stops with status 75 (as on SIGTERM / SIGUSR1 under torchrun), then the job requeues
itself through submitit and, started again, continues from the run directory's newest checkpoint. ``--dry-run`` prints the job instead of
submitting it; ``--local`` runs it on this machine with submitit's local executor (tasks as processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from dino.checkpoint import CheckpointManager
from dino.config import ConfigError
from dino.train.trainer import EXIT_PREEMPTED

log = logging.getLogger("dino.cli")

_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm",
        help="submit `dino train` to SLURM (submitit): requeued on preemption or time limit, resumed",
        description="Submit a training command as a SLURM job, one task per GPU: dino slurm --nodes 2 "
        "--gpus-per-node 8 --partition P --time 24:00:00 -- train --config vit_small_100ep --data DIR "
        "--output RUN. Needs submitit (pip install 'dino[slurm]').",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one task each (default 1)")
    p.add_argument(
        "--tasks-per-node", type=int, help="training processes per node (default: --gpus-per-node, or 1)"
    )
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (default 10)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument(
        "--time", default="24:00:00", help="time limit per submission, [D-]HH:MM:SS (default 24 h)"
    )
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--job-name", default="dino", help="job name (default dino)")
    p.add_argument(
        "--signal-delay", type=int, default=180,
        help="seconds before the time limit at which the job saves and requeues (default 180)",
    )  # fmt: skip
    p.add_argument("--folder", help="submitit's job files and logs (default: RUN/slurm)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the job that would be submitted, submit nothing"
    )
    p.add_argument(
        "--local", action="store_true",
        help="run the job on this machine with submitit's local executor (tasks as processes) and wait for it",
    )  # fmt: skip
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- train [its options and key=value overrides]")
    p.set_defaults(func=run_slurm)


def run_slurm(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if command[:1] != ["train"]:
        raise ConfigError(
            "dino slurm submits a training command: dino slurm [options] -- train [train options]"
        )
    run_dir = _checked_run_directory(command)
    minutes = _minutes(args.time)
    for name in ("nodes", "cpus_per_task"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 or more, got {args.gpus_per_node}")
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    if tasks < 1:
        raise ConfigError(f"--tasks-per-node must be at least 1, got {tasks}")
    if not 0 < args.signal_delay < minutes * 60:
        raise ConfigError(f"--signal-delay must be between 0 and the time limit ({minutes * 60} s)")
    if args.local and args.nodes != 1:
        raise ConfigError("--local runs on this machine: --nodes must be 1")
    folder = Path(args.folder) if args.folder else run_dir / "slurm"
    submitit = _import_submitit()
    job = TrainingJob(command, str(run_dir))
    if args.local:
        executor: Any = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(
            timeout_min=minutes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
            signal_delay_s=args.signal_delay,
        )  # fmt: skip
    elif args.dry_run:  # the batch script only: no SLURM needed on this machine
        print(_batch_script(folder, _slurm_parameters(args, minutes, tasks), job))
        return 0
    else:
        executor = submitit.SlurmExecutor(folder=str(folder / "%j"))
        executor.update_parameters(**_slurm_parameters(args, minutes, tasks))
    if args.dry_run:
        print(f"local executor: {json.dumps(executor.parameters, sort_keys=True)}\n{_task_lines(job)}")
        return 0
    submitted = executor.submit(job)
    print(f"submitted job {submitted.job_id}: logs in {folder}, run directory {run_dir}")
    if args.local:
        submitted.results()  # every task's; raises with a task's error when one fails
        print(f"job {submitted.job_id} done: run directory {run_dir}")
    return 0


def _checked_run_directory(command: list[str]) -> Path:
    """The run directory of ``dino train`` ``command`` (its settings validated here, before anything is
    submitted: a typo should not wait in a queue for hours to fail)."""
    from dino.cli import parse_args
    from dino.cli.train import train_config

    cfg, _ = train_config(parse_args(command))
    return Path(cfg.run.output_dir).expanduser().resolve()


def _minutes(time: str) -> int:
    match = _TIME.match(time)
    if match is None:
        raise ConfigError(f"--time must be [D-]HH:MM:SS, e.g. 24:00:00 or 2-00:00:00, got {time!r}")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = days * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)  # SLURM's minutes, rounded up
    if total < 1:
        raise ConfigError(f"--time must be at least one minute, got {time!r}")
    return total


def _slurm_parameters(args: argparse.Namespace, minutes: int, tasks: int) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "job_name": args.job_name,
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task,
        "time": minutes,
        "signal_delay_s": args.signal_delay,
    }
    if args.gpus_per_node:
        parameters["gpus_per_node"] = args.gpus_per_node
    for name in ("partition", "account", "qos"):
        if getattr(args, name):
            parameters[name] = getattr(args, name)
    return parameters


def _batch_script(folder: Path, parameters: dict[str, Any], job: TrainingJob) -> str:
    """The sbatch script submitit would submit (its own text, from its job-file writer) and what each task
    runs."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join(
        [shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder / "%j"))]
    )
    script = _make_sbatch_string(command=command, folder=str(folder / "%j"), **parameters)
    return f"{script.rstrip()}\n\n{_task_lines(job)}"


def _task_lines(job: TrainingJob) -> str:
    return f"each task runs: dino {shlex.join(job.argv)}\nrun directory: {job.run_dir}"


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError as err:
        raise ConfigError(
            "dino slurm needs submitit: pip install 'dino[slurm]' (or pip install submitit)"
        ) from err
    return submitit


class TrainingJob:
    """What each task of the job runs: ``dino train`` with the torchrun environment derived from SLURM's.
    Picklable (submitit ships it to the nodes); :meth:`checkpoint` is what submitit requeues."""

    def __init__(self, argv: list[str], run_dir: str) -> None:
        self.argv = list(argv)
        self.run_dir = run_dir

    def __call__(self) -> int:
        import submitit

        from dino.cli import main

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        try:
            status = main(self.argv)
        except SystemExit as stop:  # Preempted (75), Ctrl-C (130)
            status = stop.code if isinstance(stop.code, int) else 1
        if status == EXIT_PREEMPTED:
            # Saved and stopped on the job's warning signal (or SIGTERM): hand the signal to submitit's own
            # handler, put back by the training, which requeues the job on the first task (and exits).
            signal.raise_signal(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))
            return status
        if status != 0:
            raise RuntimeError(f"dino train exited with status {status}; see the job's log")
        return status

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The job to requeue: the same training, continued from the run directory's newest checkpoint once
        it has one (a ``--resume PATH`` or ``--no-resume`` of the first start no longer applies)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(self.requeue_argv(), self.run_dir))

    def requeue_argv(self) -> list[str]:
        manager = CheckpointManager(Path(self.run_dir))
        if not (manager.rolling() or manager.keepers()):
            return list(self.argv)
        argv: list[str] = []
        skip = False
        for arg in self.argv:
            if skip:
                skip = False
            elif arg == "--resume":
                skip = True
            elif arg == "--no-resume" or arg.startswith("--resume="):
                continue
            else:
                argv.append(arg)
        return argv
