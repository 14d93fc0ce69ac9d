"""A study file: the base configuration, the budget and the variants, checked before anything trains.

    title: Centering and sharpening against collapse (paper Fig. 7)
    description: one paragraph on what the study shows
    config: cifar_small                 # preset or YAML file (relative to the study file) of every variant
    overrides: [monitor.knn_every=1]    # dotted overrides of every variant
    budget: {images: 24000}             # or {epochs: N} or {minutes: M}
    variants:                           # name: the overrides that make this variant
      DINO (centering + sharpening): []
      centering only: [loss.teacher_temp=0.1, loss.warmup_teacher_temp=0.1]

A budget in images becomes the whole number of epochs nearest to it (at least one) over the training
folder; the schedules then span the run. A budget in minutes keeps the schedules of ``run.epochs`` and
ends each variant at the first epoch end after that much training (``run.max_minutes``).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dino.config import ConfigError, DINOConfig, load_config, packaged_yaml_names, resolve_packaged_yaml

KNOWN_KEYS = {"title", "description", "config", "overrides", "budget", "variants"}
BUDGET_KINDS = ("images", "epochs", "minutes")


class StudyError(ConfigError):
    """A study file that cannot be run as written; the message says what to change."""


@dataclass
class Variant:
    name: str
    overrides: list[str]

    @property
    def slug(self) -> str:
        """The variant's folder name: its name in lower case, runs of other characters as one ``-``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class StudySpec:
    name: str
    title: str
    description: str
    config: str | None
    overrides: list[str]
    budget: dict[str, float]
    variants: list[Variant]
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def variant(self, name_or_slug: str) -> Variant:
        for v in self.variants:
            if name_or_slug in (v.name, v.slug):
                return v
        raise StudyError(
            f"study {self.name} has no variant {name_or_slug!r}; its variants: "
            + ", ".join(f"{v.name!r} ({v.slug})" for v in self.variants)
        )

    def variant_config(self, variant: Variant, run_dir: Path, extra: list[str] | None = None) -> DINOConfig:
        """The variant's validated configuration: base ← study overrides ← budget ← variant ← ``extra``
        (the command line's), training into ``run_dir``."""
        overrides = [*self.overrides, *variant.overrides, *(extra or []), f"run.output_dir={run_dir}"]
        try:
            cfg = load_config(self.config, overrides)
        except ConfigError as err:
            raise StudyError(f"study {self.name}, variant {variant.name!r}: {err}") from err
        return self._apply_budget(cfg, variant, overrides)

    def _apply_budget(self, cfg: DINOConfig, variant: Variant, overrides: list[str]) -> DINOConfig:
        kind, amount = next(iter(self.budget.items()))
        if kind == "epochs":
            budget = [f"run.epochs={int(amount)}"]
        elif kind == "minutes":
            budget = [f"run.max_minutes={amount}"]
        else:
            n_images = count_training_images(cfg)
            budget = [f"run.epochs={max(1, round(amount / n_images))}"]
        return load_config(self.config, [*overrides[:-1], *budget, overrides[-1]])


def count_training_images(cfg: DINOConfig) -> int:
    """Images in the training folder of ``cfg`` (the bundled sample when ``data.path`` is unset)."""
    from dino.data.sample import sample_dataset

    return _count_images(str(cfg.data.path if cfg.data.path is not None else sample_dataset("train")))


@functools.lru_cache(maxsize=8)
def _count_images(root: str) -> int:
    from dino.data.datasets import ImageFolderDataset

    return len(ImageFolderDataset(root, transform=None))


def study_names() -> list[str]:
    """The studies shipped with the package (``dino study NAME``)."""
    return packaged_yaml_names("studies")


def _resolve(name_or_path: str | Path) -> Path:
    try:
        return resolve_packaged_yaml(name_or_path, "studies", what="study", shipped="shipped study")
    except ConfigError as err:
        raise StudyError(str(err)) from None


def load_study(name_or_path: str | Path) -> StudySpec:
    """Read a study file (or a shipped study by name) and check it, every variant's configuration included,
    so that a typo in the last variant stops the study before the first one trains."""
    path = _resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"cannot read study {path}: {err}") from err
    if not isinstance(raw, dict):
        raise StudyError(f"study {path} must be a mapping with the keys {sorted(KNOWN_KEYS)}")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise StudyError(f"study {path}: unknown keys {unknown}; allowed: {sorted(KNOWN_KEYS)}")
    spec = StudySpec(
        name=path.stem,
        title=str(raw.get("title") or path.stem),
        description=str(raw.get("description") or "").strip(),
        config=_base_config(raw.get("config"), path),
        overrides=_override_list(raw.get("overrides"), f"study {path}: overrides"),
        budget=_budget(raw.get("budget"), path),
        variants=_variants(raw.get("variants"), path),
        source=path,
        raw=raw,
    )
    for variant in spec.variants:  # every configuration valid before anything trains
        spec.variant_config(variant, Path("unused"))
    return spec


def _base_config(config: Any, path: Path) -> str | None:
    if config is None:
        return None
    candidate = (path.parent / str(config)).resolve()
    return str(candidate) if candidate.is_file() else str(config)


def _override_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(o, str) and "=" in o for o in value):
        raise StudyError(f"{what} must be a list of key=value strings, got {value!r}")
    return list(value)


def _budget(value: Any, path: Path) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in BUDGET_KINDS:
        raise StudyError(
            f"study {path}: budget must name exactly one of {BUDGET_KINDS}, e.g. budget: {{images: 24000}}; "
            f"got {value!r}"
        )
    kind, amount = next(iter(value.items()))
    if not isinstance(amount, int | float) or not math.isfinite(amount) or amount <= 0:
        raise StudyError(f"study {path}: budget {kind} must be a positive number, got {amount!r}")
    if kind in ("images", "epochs") and amount != int(amount):
        raise StudyError(f"study {path}: budget {kind} must be a whole number, got {amount!r}")
    return {kind: float(amount)}


def _variants(value: Any, path: Path) -> list[Variant]:
    if not isinstance(value, dict) or not value:
        raise StudyError(f"study {path}: variants must be a mapping of names to override lists, e.g. "
                         "variants: {DINO: [], 'no centering': [loss.teacher_norm=none]}")  # fmt: skip
    variants = [
        Variant(str(name), _override_list(overrides, f"study {path}: variant {name!r}"))
        for name, overrides in value.items()
    ]
    slugs = [v.slug for v in variants]
    clashes = sorted({s for s in slugs if slugs.count(s) > 1 or not s})
    if clashes:
        raise StudyError(f"study {path}: variant names must differ in letters or digits; clashing: {clashes}")
    return variants
