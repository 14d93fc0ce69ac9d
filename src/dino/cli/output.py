"""How every command reports its results: a markdown table on stdout and, on request, a JSON file."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dino.checkpoint import atomic_write_text
from dino.eval.sharding import is_main_process


def write_results(
    results: Mapping[str, Any], path: str | Path | None, title: str, detail: str | None = None
) -> None:
    """Print ``results`` as a two-column markdown table under ``title`` and write them as JSON to ``path``.

    Nested dicts become dotted keys in the table; the JSON keeps the nesting. Non-finite floats are written
    as null so that the file stays valid JSON. ``detail`` names a bulky entry (per-image or per-query
    numbers) kept out of the table, in the JSON file only.
    """
    if not is_main_process():  # under torchrun, the first process reports for all
        return
    rows = list(_flatten({k: v for k, v in results.items() if k != detail}))
    width = max([len("metric")] + [len(k) for k, _ in rows])
    lines = [f"## {title}", "", f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {_format_value(v)} |" for k, v in rows]
    print("\n".join(lines), file=sys.stdout, flush=True)
    if path:
        atomic_write_text(
            Path(path).expanduser(), json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"
        )


def _flatten(data: Mapping[str, Any], prefix: str = ""):
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.2f}" if 1 <= abs(value) < 1e5 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
