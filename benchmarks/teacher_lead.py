"""Is the momentum teacher ahead of its student (paper Fig. 6 left), measured closely enough to tell?

Trains the ``cifar_small`` recipe (with any ``key=value`` overrides after ``--``) on the bundled sample and,
after every epoch, scores with the weighted k-NN (k = 20, T = 0.07, the sample's 4,000 training images as
the bank) on ``--per-class`` × 10 held-out images of the CIFAR-10 JPEG copy in ``../shared/data`` that the
sample does not hold (10,000 by default, against the monitor's 1,000):

- the teacher and the student as they are (each with its own BatchNorm statistics: the teacher's gathered
  by its forward passes on the global crops, the student's on global and local crops);
- the student with its BatchNorm statistics recomputed on 1,000 clean training images (``student_bn``);
- exponential averages of the student's weights at ``--shadows`` momenta (kept beside the run, which they do
  not influence), statistics recomputed the same way (``ema<m>_bn``): whether an average of the student's
  recent weights beats the student at some horizon, whatever the teacher's own momentum.

Each row also gives the paired standard error of teacher − student (from the images on which only one of
the two is right), so a lead can be told from the noise of the measurement.

    python benchmarks/teacher_lead.py --epochs 8 --out benchmarks/results/teacher_lead_cpu.json
    python benchmarks/teacher_lead.py --epochs 8 -- optim.min_lr=0.002 teacher.momentum=0.99
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import benchmark_parser, report, save_partial
from first_run import cifar_heldout
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset

from dino.config import load_config
from dino.data.datasets import ImageFolderDataset
from dino.eval.features import extract_features
from dino.eval.knn import knn_predict
from dino.train.distributed import init_distributed
from dino.train.trainer import Trainer


class Scorer:
    """Per-image k-NN correctness of a backbone on the held-out images, against the sample's bank."""

    def __init__(self, bank: ImageFolderDataset, heldout: ImageFolderDataset, device: torch.device) -> None:
        self.bank, self.heldout, self.device = bank, heldout, device
        if bank.classes != heldout.classes:
            raise SystemExit(f"class folders differ: {bank.classes} vs {heldout.classes}")

    def correct(self, backbone: nn.Module) -> Tensor:
        bank_f, bank_y = extract_features(backbone, self.bank, self.device, 256)
        test_f, test_y = extract_features(backbone, self.heldout, self.device, 256)
        scores = knn_predict(
            bank_f, bank_y, test_f, k=20, temperature=0.07, num_classes=len(self.bank.classes)
        )
        return scores.argmax(dim=1) == test_y


def paired(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Accuracy difference a − b in points and its paired standard error (from the discordant images)."""
    n = a.numel()
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    diff = 100.0 * (only_a - only_b) / n
    se = 100.0 * math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n
    return round(diff, 2), round(se, 2)


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = benchmark_parser(__doc__, device=False)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=1000, help="held-out images per class")
    parser.add_argument("--shadows", default="0.96,0.99", help="momenta of the weight averages ('' for none)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dino-teacher-lead"))
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    heldout_dir = cifar_heldout(args.scratch, args.per_class)
    if heldout_dir is None:
        raise SystemExit("needs the CIFAR-10 copy in ../shared/data (cifar10-train-jpeg.tar.gz)")
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.scratch))
    cfg = load_config(
        "cifar_small",
        [
            f"run.output_dir={run_dir}", "run.progress_bar=never", "monitor.knn_student=true",
            f"run.epochs={args.epochs}", *overrides,
        ],
    )  # fmt: skip
    env = init_distributed("cpu")
    trainer = Trainer(cfg, env, resume=False)
    assert trainer.knn is not None, "the recipe's k-NN monitor gives the bank"
    transform = trainer.knn.train.transform
    scorer = Scorer(
        trainer.knn.train, ImageFolderDataset(heldout_dir, transform=transform, labelled=True), env.device
    )
    clean = DataLoader(Subset(trainer.knn.train, range(0, len(trainer.knn.train), 4)), batch_size=250)
    student = trainer.student.backbone
    momenta = [float(m) for m in args.shadows.split(",") if m]
    shadows = {m: [p.detach().clone() for p in student.parameters()] for m in momenta}
    probe = copy.deepcopy(trainer.teacher.backbone)

    step = trainer.training_step.step

    def step_and_average(*a, **k):
        out = step(*a, **k)
        with torch.no_grad():
            weights = [p.detach() for p in student.parameters()]
            for m, average in shadows.items():
                torch._foreach_lerp_(average, weights, 1.0 - m)
        return out

    def with_recomputed_batchnorm(weights: list[Tensor]) -> Tensor:
        with torch.no_grad():
            torch._foreach_copy_(list(probe.parameters()), weights)
            update_bn(clean, probe)  # each BatchNorm's statistics: the plain average over the clean images
        return scorer.correct(probe)

    rows: list[dict] = []
    end_epoch = trainer.end_epoch

    def score_then_end_epoch() -> None:
        started = time.monotonic()
        teacher = scorer.correct(trainer.teacher.backbone)
        student_own = scorer.correct(student)
        row: dict = {"epoch": trainer.state.epoch + 1}
        row["teacher"] = round(100.0 * teacher.float().mean().item(), 2)
        row["student"] = round(100.0 * student_own.float().mean().item(), 2)
        row["teacher_minus_student"], row["se"] = paired(teacher, student_own)
        student_bn = with_recomputed_batchnorm([p.detach() for p in student.parameters()])
        row["student_bn"] = round(100.0 * student_bn.float().mean().item(), 2)
        for m, average in shadows.items():
            average_bn = with_recomputed_batchnorm(average)
            row[f"ema{m}_bn"] = round(100.0 * average_bn.float().mean().item(), 2)
            row[f"ema{m}_bn_minus_student_bn"], row[f"ema{m}_se"] = paired(average_bn, student_bn)
        row["score_seconds"] = round(time.monotonic() - started, 1)
        rows.append(row)
        save_partial("teacher_lead", env.device, {"overrides": overrides, "epochs": rows}, args.out)
        print(row, flush=True)
        end_epoch()

    trainer.training_step.step = step_and_average  # type: ignore[method-assign]
    trainer.end_epoch = score_then_end_epoch  # type: ignore[method-assign]
    trainer.fit()
    leads = [r["teacher_minus_student"] for r in rows]
    body = {
        "recipe": "cifar_small",
        "overrides": overrides,
        "heldout_images": len(scorer.heldout),
        "bank_images": len(scorer.bank),
        "epochs": rows,
        "teacher_ahead_epochs": sum(d > 0 for d in leads),
        "teacher_behind_epochs": sum(d < 0 for d in leads),
        "mean_teacher_minus_student": round(sum(leads) / len(leads), 2),
        "command": "python benchmarks/teacher_lead.py " + " ".join(sys.argv[1:]),
    }
    report("teacher_lead", env.device, body, rows, args.out)


if __name__ == "__main__":
    main()
