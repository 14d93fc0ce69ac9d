"""``dino plot``: the training curves of one run or several overlaid, in one PNG (:mod:`dino.train.curves`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dino.train.curves import RunCurves, plot_runs


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dino plot``."""
    p = sub.add_parser(
        "plot",
        help="draw the training curves of one run or several overlaid",
        description="Draw the curves of runs from their log.jsonl into one PNG: loss, teacher entropy "
        "(with its collapse limits 0 and ln K), KL(teacher‖student), k-NN accuracy against random init, "
        "learning rate, weight decay, teacher temperature and momentum, images/s; against images seen. "
        "Each run is one colour, named in the legends.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or their log.jsonl files)")
    p.add_argument("--out", "-o", required=True, help="the PNG file to write")
    p.add_argument(
        "--name",
        action="append",
        help="a legend name per run, in order (default: each run directory's name); repeat for each run",
    )
    p.add_argument("--title", help="the figure's title (default: names the runs)")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the picture is a PNG; give a file name ending in .png")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    names = args.name or []
    if names and len(names) != len(args.runs):
        raise ValueError(
            f"--name given {len(names)} times for {len(args.runs)} runs: give one per run, or none"
        )
    runs = [RunCurves.read(run, names[i] if names else None) for i, run in enumerate(args.runs)]
    if len({r.name for r in runs}) < len(runs):
        raise ValueError(
            f"two runs share the legend name {[r.name for r in runs]}: name them with --name A --name B …"
        )
    empty = [r.name for r in runs if not r.iters and not r.knn]
    if len(empty) == len(runs):
        raise ValueError(f"no iteration or k-NN records in {', '.join(args.runs)}: nothing to plot yet")
    written = plot_runs(runs, out, args.title)
    note = f" ({', '.join(empty)}: nothing logged yet)" if empty else ""
    print(f"wrote {written}: {len(runs)} run(s){note}")
    return 0
