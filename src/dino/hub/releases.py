"""The released models and the cache folder their files live in.

The original model names (``dino_vits16``, ``dino_vits8``, ``dino_vitb16``, ``dino_vitb8``,
``dino_resnet50``) resolve to their architecture and to the released file name in a cache folder
(``$DINO_HOME``, default ``~/.cache/dino``); a file is downloaded only when the caller passes
``download=True``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from dino.hub.errors import WeightsError

log = logging.getLogger("dino.hub")  # the package's logger: log records keep the name they always had

ENV_HOME = "DINO_HOME"
DEFAULT_HOME = "~/.cache/dino"
_URL_ROOT = "https://dl.fbaipublicfiles.com/dino"


@dataclass(frozen=True)
class Release:
    """One model of the original DINO release: its architecture and file names."""

    arch: str
    patch_size: int
    stem: str  # e.g. dino_deitsmall16_pretrain

    @property
    def file(self) -> str:
        """Backbone-only teacher weights."""
        return f"{self.stem}.pth"

    @property
    def full_file(self) -> str:
        """Full training checkpoint (student, teacher, heads, center, optimizer, args)."""
        return f"{self.stem}_full_checkpoint.pth"

    def url(self, full: bool = False) -> str:
        return f"{_URL_ROOT}/{self.stem}/{self.full_file if full else self.file}"


RELEASES: Mapping[str, Release] = MappingProxyType(
    {
        "dino_vits16": Release("vit_small", 16, "dino_deitsmall16_pretrain"),
        "dino_vits8": Release("vit_small", 8, "dino_deitsmall8_pretrain"),
        "dino_vitb16": Release("vit_base", 16, "dino_vitbase16_pretrain"),
        "dino_vitb8": Release("vit_base", 8, "dino_vitbase8_pretrain"),
        "dino_resnet50": Release("resnet50", 0, "dino_resnet50_pretrain"),
    }
)


def weights_folder(override: str | Path | None = None) -> Path:
    """The cache folder for released weights: ``override``, else ``$DINO_HOME``, else ``~/.cache/dino``."""
    return Path(override or os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser()


def resolve_weights(
    name_or_path: str | Path,
    weights_dir: str | Path | None = None,
    download: bool = False,
    full: bool = False,
) -> Path:
    """The local file (or run directory) that ``name_or_path`` designates.

    Accepts an existing path, a released model name (its backbone file, or with ``full`` its full training
    checkpoint, in the cache folder), a bare file name found in the cache folder, or an ``http(s)`` URL
    (cached under its file name). Missing files are fetched only with ``download=True``.
    """
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    cache = weights_folder(weights_dir)
    if spec in RELEASES:
        release = RELEASES[spec]
        target = cache / (release.full_file if full else release.file)
        url = release.url(full)
    elif spec.startswith(("https://", "http://")):
        target, url = cache / spec.rstrip("/").rsplit("/", 1)[-1], spec
    elif "/" not in spec and (cache / spec).is_file():
        return cache / spec
    else:
        raise WeightsError(
            f"{spec} is neither an existing file or run directory nor a released model name "
            f"({', '.join(RELEASES)}); check the path"
        )
    if target.is_file():
        return target
    if not download:
        raise WeightsError(
            f"{spec} needs {target}, which is missing: download {url} into {cache} (or point ${ENV_HOME} / "
            f"--weights-dir at the folder holding it), or pass --download (download=True) to fetch it"
        )
    return _download(url, target)


def _download(url: str, target: Path) -> Path:
    """Fetch ``url`` to ``target`` atomically (a partial download never looks like a weights file)."""
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    log.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh, length=1 << 20)
        os.replace(tmp, target)
    except OSError as err:  # urllib.error.URLError is an OSError
        tmp.unlink(missing_ok=True)
        raise WeightsError(
            f"could not download {url} ({err}); fetch it yourself into {target.parent} and try again"
        ) from err
    return target
