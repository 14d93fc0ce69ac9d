"""Studies: a grid of training variants, each trained for the same budget and scored with k-NN on held-out
images, then compared in one table and a few figures (``dino study STUDY.yaml``).

:mod:`~dino.study.spec` reads and checks a study file, :mod:`~dino.study.runner` trains its variants
(resuming where a study stopped), :mod:`~dino.study.report` writes ``study.md``, ``study.json`` and the
figures from the variants' logs.
"""

from dino.study.report import StudyReport, write_report
from dino.study.runner import run_study
from dino.study.spec import StudyError, StudySpec, Variant, load_study, study_names

__all__ = [
    "StudyError",
    "StudyReport",
    "StudySpec",
    "Variant",
    "load_study",
    "run_study",
    "study_names",
    "write_report",
]
