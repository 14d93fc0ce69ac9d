"""``dino extract``, ``dino knn``, ``dino linear`` and ``dino lowshot``: the classification evaluations.

Model, device and image options are shared (:mod:`dino.cli.arguments`); the work is done by
:mod:`dino.eval.extract`, :mod:`dino.eval.knn`, :mod:`dino.eval.linear` and :mod:`dino.eval.lowshot`.
:class:`FeatureProvider` gives each evaluation its features from image folders or cached feature files.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dino.cli.arguments import (
    MANY,
    add_image_arguments,
    add_model_arguments,
    add_precision_argument,
    device_from_args,
    eval_transform_from_args,
    model_from_args,
)
from dino.cli.output import write_results
from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import EvalTransform
from dino.devices import autocast_dtype_for
from dino.eval.extract import (
    check_same_model,
    extract_folder,
    is_feature_file,
    model_info,
    num_blocks,
    transform_info,
)
from dino.eval.features import (
    DEFAULT_GEM_P,
    FeatureSet,
    Representation,
    check_representations,
    default_representations,
    extract_representations,
    linear_representation,
    paper_linear_representation,
)
from dino.eval.knn import DEFAULT_BANK_CHUNK, DEFAULT_KS, DEFAULT_TEMPERATURE, knn_accuracy
from dino.eval.linear import (
    DEFAULT_LRS,
    SweepResult,
    stratified_split,
    sweep_augmented,
    sweep_on_cached,
    train_transform,
)
from dino.eval.lowshot import DEFAULT_FRACTIONS, DEFAULT_L2, lowshot_evaluate
from dino.eval.sharding import is_main_process
from dino.hub import LoadedBackbone
from dino.output_paths import writable_file

log = logging.getLogger(__name__)

_CROP_NOTE = (
    "Images are resized (shorter side, bicubic) to --resize and centre-cropped to --crop-size; by default the "
    "crop is the model's training crop size (224 for released models, e.g. 32 for a CIFAR run) and the resize "
    "crop × 8/7, normalised as in training when the run's config is at hand."
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dino extract``, ``dino knn``, ``dino linear`` and ``dino lowshot``."""
    _add_extract(sub)
    _add_knn(sub)
    _add_linear(sub)
    _add_lowshot(sub)


class FeatureProvider:
    """Features for the evaluation commands, from image folders (through the model) or cached files.

    The model and its transform are loaded on first use, so evaluations of cached files need no weights.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._loaded: LoadedBackbone | None = None
        self._transform: EvalTransform | None = None

    @property
    def model_loaded(self) -> bool:
        """Whether the model has run (some source was an image folder)."""
        return self._loaded is not None

    @property
    def loaded(self) -> LoadedBackbone:
        if self._loaded is None:
            self._loaded = model_from_args(self.args)
            log.info("model: %s", model_info(self._loaded))
        return self._loaded

    @property
    def transform(self) -> EvalTransform:
        if self._transform is None:
            self._transform = eval_transform_from_args(self.args, self.loaded)
        return self._transform

    def get(self, source: str | Path, representations: Sequence[str], desc: str) -> FeatureSet:
        """A labelled feature set from a feature file or an image folder with class sub-folders."""
        if is_feature_file(source):
            features = FeatureSet.load(source)
            for name in representations:
                features.get(name)  # fails early, naming the stored representations
        else:
            if not Path(source).expanduser().is_dir():
                raise FileNotFoundError(f"{source} is neither an image folder nor a .pt/.npz feature file")
            features = extract_folder(
                self.loaded,
                source,
                self.transform,
                device_from_args(self.args),
                representations,
                self.args.batch_size,
                self.args.num_workers,
                getattr(self.args, "gem_p", DEFAULT_GEM_P),
                labelled=True,
                desc=desc,
                precision=getattr(self.args, "precision", "auto"),
            )
        if not features.labelled:
            raise ValueError(f"{source} has no labels; give a folder with one sub-folder per class")
        return features


def _add_split_arguments(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--train", metavar="DIR_OR_FILE", help=f"labelled image folder or feature file for the {what}"
    )
    g.add_argument(
        "--test", metavar="DIR_OR_FILE", help="labelled image folder or feature file to evaluate on"
    )
    g.add_argument("--train-features", metavar="FILE", help="cached training features (from `dino extract`)")
    g.add_argument("--test-features", metavar="FILE", help="cached test features (from `dino extract`)")


def _sources(args: argparse.Namespace) -> tuple[str, str]:
    """The train and test sources, each given once as a folder or feature file, checked to exist."""
    picked = []
    for split in ("train", "test"):
        folder, cached = getattr(args, split), getattr(args, f"{split}_features")
        if bool(folder) == bool(cached):
            raise ValueError(f"give exactly one of --{split} DIR_OR_FILE and --{split}-features FILE")
        source = cached or folder
        if cached and not is_feature_file(cached):
            raise ValueError(
                f"--{split}-features {cached} must be a .pt or .npz file written by `dino extract`"
            )
        if not Path(source).expanduser().exists():
            raise FileNotFoundError(f"--{split} {source} does not exist")
        picked.append(str(source))
    return picked[0], picked[1]


def _needs_model(args: argparse.Namespace, sources: tuple[str, ...]) -> None:
    if (
        any(not is_feature_file(s) for s in sources)
        and not args.weights
        and not (args.random_init and args.arch)
    ):
        raise ValueError(
            "image folders need a model: pass --weights PATH_OR_NAME (or --random-init --arch ARCH)"
        )


def _train_test(
    provider: FeatureProvider,
    sources: tuple[str, str],
    rep: str,
    what: str,
    train: FeatureSet | None = None,
) -> tuple[FeatureSet, FeatureSet]:
    """Labelled train and test features holding only representation ``rep``, test labels indexed like train's.

    ``train``: the training features when the caller has already read them (from ``sources[0]``). The other
    representations of a feature file are dropped, so later subsets copy only the one used.
    """
    if train is None:
        train = provider.get(sources[0], [rep], f"{what} train")
    train = train.only(rep)
    test = provider.get(sources[1], [rep], f"{what} test").relabelled(train.classes).only(rep)
    check_same_model(train, test)
    return train, test


def _common_results(provider: FeatureProvider, train: FeatureSet) -> dict[str, Any]:
    """The model and transform behind the numbers: the one that ran here, else the feature file's."""
    if provider.model_loaded:
        return {"model": model_info(provider.loaded), "transform": transform_info(provider.transform)}
    return {key: train.meta[key] for key in ("model", "transform") if key in train.meta}


# --- dino extract ---------------------------------------------------------------------------------------


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="save a folder's frozen features (several representations) for reuse by the evaluations",
        description="Run a frozen backbone over an image folder and save its features with the file list, labels "
        "and classes, as .pt (torch.load(weights_only=True)) or .npz. Representations: cls, cls_last<n> (the [CLS] "
        "of the last n blocks), mean (mean patch token), gem (GeM-pooled patch tokens), joined with '+', e.g. "
        "cls+mean. " + _CROP_NOTE,
    )
    p.add_argument("folder", help="image folder (class sub-folders give labels; a flat folder is unlabelled)")
    p.add_argument(
        "--out", required=True, metavar="FILE", type=writable_file, help="feature file to write (.pt or .npz)"
    )
    p.add_argument(
        "--representations",
        nargs="+",
        metavar="NAME",
        help="what to save (default for a ViT: cls cls_last4 cls+mean gem; for a ResNet: cls gem)",
    )
    p.add_argument(
        "--gem-p",
        type=float,
        default=DEFAULT_GEM_P,
        help=f"GeM exponent (default {DEFAULT_GEM_P:g}, the paper's copy-detection descriptor)",
    )
    add_model_arguments(p)
    add_precision_argument(p)
    add_image_arguments(p)
    p.set_defaults(func=run_extract, processes=MANY)


def run_extract(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.suffix not in (".pt", ".npz"):
        raise ValueError(f"--out {out} must end in .pt or .npz")
    if not Path(args.folder).expanduser().is_dir():
        raise FileNotFoundError(f"image folder {args.folder} does not exist")
    provider = FeatureProvider(args)
    loaded = provider.loaded
    names = args.representations or default_representations(loaded.model)
    check_representations(loaded.model, names)
    features = extract_folder(
        loaded,
        args.folder,
        provider.transform,
        device_from_args(args),
        names,
        args.batch_size,
        args.num_workers,
        args.gem_p,
        desc="extract",
        precision=args.precision,
    )
    if is_main_process():
        features.save(out)
    results = {
        "file": str(out),
        "images": len(features),
        "classes": len(features.classes),
        "labelled": features.labelled,
        "dims": {name: int(f.shape[1]) for name, f in features.features.items()},
        "seconds": features.meta["seconds"],
        "images_per_second": len(features) / max(features.meta["seconds"], 1e-9),
        "model": features.meta["model"],
        "transform": features.meta["transform"],
    }
    write_results(results, args.output, f"features of {args.folder}")
    return 0


# --- dino knn -------------------------------------------------------------------------------------------


def _add_knn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "knn",
        help="weighted k-NN classification on frozen features (top-1/top-5 for several k)",
        description="The paper's k-NN protocol: L2-normalised features, cosine similarity, the k nearest training "
        "images vote for their class with weight exp(sim/T). Classes come from the train folder's sub-folders "
        "(the test folder's are matched by name). Top-5 counts only classes that got a vote: no vote, no hit "
        "(with k < 5 or few classes among the neighbours, the original script, which sorts every class, can "
        "count an unvoted class by its tie order). " + _CROP_NOTE,
    )
    _add_split_arguments(p, "k-NN bank")
    p.add_argument(
        "--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="values of k (default 10 20 100 200)"
    )
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="vote temperature T (0.07)")
    p.add_argument("--representation", default="cls", help="feature representation (default: cls)")
    p.add_argument(
        "--bank-chunk-size",
        type=int,
        default=DEFAULT_BANK_CHUNK,
        help="bank rows compared at once; lower it if a huge bank runs out of memory",
    )
    p.add_argument("--query-chunk-size", type=int, default=1024, help="test rows compared at once")
    add_model_arguments(p)
    add_precision_argument(p)
    add_image_arguments(p)
    p.set_defaults(func=run_knn, processes=MANY)


def run_knn(args: argparse.Namespace) -> int:
    train_src, test_src = _sources(args)
    _needs_model(args, (train_src, test_src))
    Representation.parse(args.representation)
    if args.temperature <= 0 or min(args.ks) < 1:
        raise ValueError("--temperature must be positive and every --ks value at least 1")
    provider = FeatureProvider(args)
    train, test = _train_test(provider, (train_src, test_src), args.representation, "knn")
    device = device_from_args(args)
    start = time.perf_counter()
    acc = knn_accuracy(
        train.get(args.representation),
        train.labels,
        test.get(args.representation),
        test.labels,
        ks=args.ks,
        temperature=args.temperature,
        num_classes=len(train.classes),
        chunk_size=args.query_chunk_size,
        bank_chunk_size=args.bank_chunk_size,
        device=device,
    )
    results: dict[str, Any] = {f"k={k}": {"top1": top1, "top5": top5} for k, (top1, top5) in acc.items()}
    results.update(
        {
            "temperature": args.temperature,
            "representation": args.representation,
            "train_images": len(train),
            "test_images": len(test),
            "classes": len(train.classes),
            "knn_seconds": time.perf_counter() - start,
            **_common_results(provider, train),
        }
    )
    write_results(results, args.output, f"k-NN on {test_src}")
    return 0


# --- dino lowshot ---------------------------------------------------------------------------------------


def _add_lowshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lowshot",
        help="logistic regression on frozen features with 1%% / 10%% of the labels",
        description="Low-shot evaluation: for each label fraction, a deterministic subset (seeded; at least one "
        "image per class) of the training set trains a multinomial logistic regression (L-BFGS, L2-regularised, "
        "features centred and L2-normalised); top-1/top-5 on the test set. " + _CROP_NOTE,
    )
    _add_split_arguments(p, "labelled pool")
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=list(DEFAULT_FRACTIONS),
        help="label fractions (0.01 0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the labelled subsets (default 0)")
    p.add_argument(
        "--l2", type=float, default=DEFAULT_L2, help=f"L2 weight on the mean loss (default {DEFAULT_L2})"
    )
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations at most (default 1000)")
    p.add_argument("--representation", default="cls", help="feature representation (default: cls)")
    add_model_arguments(p)
    add_precision_argument(p)
    add_image_arguments(p)
    p.set_defaults(func=run_lowshot, processes=MANY)


def run_lowshot(args: argparse.Namespace) -> int:
    train_src, test_src = _sources(args)
    _needs_model(args, (train_src, test_src))
    Representation.parse(args.representation)
    if any(not 0 < f <= 1 for f in args.fractions):
        raise ValueError(f"--fractions must lie in (0, 1], got {args.fractions}")
    provider = FeatureProvider(args)
    train, test = _train_test(provider, (train_src, test_src), args.representation, "lowshot")
    start = time.perf_counter()
    per_fraction = lowshot_evaluate(
        train.get(args.representation),
        train.labels,
        test.get(args.representation),
        test.labels,
        num_classes=len(train.classes),
        fractions=args.fractions,
        seed=args.seed,
        l2=args.l2,
        max_iter=args.max_iter,
        device=device_from_args(args),
    )
    results: dict[str, Any] = dict(per_fraction)
    results.update(
        {
            "representation": args.representation,
            "l2": args.l2,
            "seed": args.seed,
            "train_images": len(train),
            "test_images": len(test),
            "classes": len(train.classes),
            "fit_seconds": time.perf_counter() - start,
            **_common_results(provider, train),
        }
    )
    write_results(results, args.output, f"low-shot logistic regression on {test_src}")
    return 0


# --- dino linear ----------------------------------------------------------------------------------------


def _add_linear(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "linear",
        help="linear probe on frozen features with a learning-rate sweep chosen on a validation split",
        description="Linear evaluation: frozen backbone, one linear head per learning rate trained together (SGD, "
        "momentum 0.9, no weight decay, cosine schedule, lr scaled by batch/256) on random-resized-crop + flip "
        "views; the head with the best accuracy on a validation split of --train is reported on --test (centre "
        "crop) after training it again with its lr on all of --train. --fast (or feature files) trains on features computed once without augmentation. Features: "
        "by default the paper's (last-4 [CLS] for ViT-S-sized models, last [CLS] + mean patch token for ViT-B "
        "and wider), or --n-last-blocks N [--avgpool-patchtokens]. " + _CROP_NOTE,
    )
    _add_split_arguments(p, "classifier")
    p.add_argument(
        "--fast", action="store_true", help="train on features computed once, without augmentation"
    )
    p.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    p.add_argument(
        "--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="learning rates swept, for batch 256"
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--n-last-blocks", type=int, help="concatenate the [CLS] tokens of the last N blocks")
    p.add_argument("--avgpool-patchtokens", action="store_true", help="append the mean patch token")
    p.add_argument(
        "--representation", help="stored representation to use with feature files (e.g. cls_last4)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of each class held out to pick the lr"
    )
    p.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="report the sweep's head (trained without the held-out share) instead of training it again "
        "with the chosen lr on all of --train (the refit doubles the time of augmented training)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the initialisation and the batches"
    )
    add_model_arguments(p)
    add_precision_argument(p)
    add_image_arguments(p)
    p.set_defaults(func=run_linear, processes=MANY)


def _linear_representation_name(args: argparse.Namespace, embed_dim: int, depth: int) -> str:
    if args.representation:
        return args.representation
    if args.n_last_blocks or args.avgpool_patchtokens:
        return linear_representation(args.n_last_blocks or 1, args.avgpool_patchtokens)
    return paper_linear_representation(embed_dim, depth)


@dataclass
class _LinearData:
    """What the learning-rate sweep trains on and is scored against.

    ``fit(indices, lrs)`` trains one head per lr on the training rows ``indices`` (``None``: every row) and
    scores them on ``val`` and ``test``; ``described_by`` names the model and transform behind the features.
    """

    fit: Callable[[torch.Tensor | None, list[float]], SweepResult]
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    val: FeatureSet
    test: FeatureSet
    classes: list[str]
    described_by: FeatureSet


def _linear_representation(
    args: argparse.Namespace, provider: FeatureProvider, train_src: str
) -> tuple[str, FeatureSet | None]:
    """The representation probed, and the training feature file when ``train_src`` is one (read once)."""
    stored: FeatureSet | None = None  # a training feature file, read once (memory-mapped for .pt)
    if is_feature_file(train_src):
        stored = provider.get(train_src, [], "linear train")
        info = stored.meta.get("model", {})
        rep = _linear_representation_name(args, int(info.get("embed_dim", 0)), int(info.get("depth", 0)))
    else:
        loaded = provider.loaded
        rep = _linear_representation_name(args, loaded.embed_dim, num_blocks(loaded.model))
        check_representations(loaded.model, [rep])
    Representation.parse(rep)
    return rep, stored


def _cached_linear_data(
    args: argparse.Namespace,
    provider: FeatureProvider,
    sources: tuple[str, str],
    rep: str,
    stored: FeatureSet | None,
    device: torch.device,
) -> _LinearData:
    """Heads trained on features computed once, without augmentation (--fast or feature files)."""
    # Only ``rep`` is kept, so the two subsets below copy it alone, not every stored representation.
    train_all, test = _train_test(provider, sources, rep, "linear", stored)
    train_idx, val_idx = stratified_split(train_all.labels, args.val_fraction, args.seed)
    val = train_all.subset(val_idx)
    classes = train_all.classes

    def fit(indices: torch.Tensor | None, lrs: list[float]) -> SweepResult:
        train = train_all if indices is None else train_all.subset(indices)  # None: every row
        return sweep_on_cached(
            train.get(rep), train.labels, val.get(rep), val.labels, test.get(rep), test.labels,
            len(classes), lrs, args.epochs, args.batch_size, args.momentum, device, args.seed,
        )  # fmt: skip

    return _LinearData(fit, train_idx, val_idx, val, test, classes, described_by=train_all)


def _augmented_linear_data(
    args: argparse.Namespace,
    provider: FeatureProvider,
    sources: tuple[str, str],
    rep: str,
    device: torch.device,
) -> _LinearData:
    """Heads trained through the frozen model on augmented views of the --train images."""
    train_src, test_src = sources
    loaded, transform = provider.loaded, provider.transform
    eval_ds = ImageFolderDataset(train_src, transform=transform, labelled=True)
    labels = torch.from_numpy(eval_ds.samples.labels.copy())
    train_idx, val_idx = stratified_split(labels, args.val_fraction, args.seed)
    autocast = autocast_dtype_for(device, args.precision)
    extract = dict(batch_size=args.batch_size, num_workers=args.num_workers, autocast_dtype=autocast)
    val = extract_representations(
        loaded.model, eval_ds, device, [rep], desc="linear val", indices=val_idx.tolist(), **extract
    )
    test = provider.get(test_src, [rep], "linear test").relabelled(eval_ds.classes)
    check_same_model(val, test)
    classes = eval_ds.classes
    aug_ds = ImageFolderDataset(
        train_src,
        transform=train_transform(transform.crop_size, transform.mean, transform.std),
        labelled=True,
    )

    def fit(indices: torch.Tensor | None, lrs: list[float]) -> SweepResult:
        indices = torch.arange(len(aug_ds)) if indices is None else indices  # None: every image
        return sweep_augmented(
            loaded.model, aug_ds, indices, rep, Representation.parse(rep).dim(loaded.embed_dim),
            val.get(rep), val.labels, test.get(rep), test.labels, len(classes), device, lrs,
            args.epochs, args.batch_size, args.momentum, args.num_workers, autocast, args.seed,
        )  # fmt: skip

    # ``val`` describes the model and transform, like the train features in the cached mode
    return _LinearData(fit, train_idx, val_idx, val, test, classes, described_by=val)


def _sweep_and_refit(
    args: argparse.Namespace, data: _LinearData
) -> tuple[SweepResult, dict[str, float], dict[str, float], int]:
    """The sweep, its chosen head's test accuracy, the reported test accuracy and how many images trained it."""
    # The learning rate is chosen on the held-out share of --train; the reported head is then trained
    # again with it on all of --train (as the paper's heads see the whole training set), unless --no-refit.
    result = data.fit(data.train_idx, list(args.lrs))
    sweep_test = {"top1": result.test_top1, "top5": result.test_top5}
    if args.refit:
        final = data.fit(None, [result.best_lr])  # the split's two parts are every training image
        test_acc = {"top1": final.test_top1, "top5": final.test_top5}
        n_train = len(data.train_idx) + len(data.val_idx)
    else:
        test_acc, n_train = sweep_test, int(data.train_idx.numel())
    return result, sweep_test, test_acc, n_train


def run_linear(args: argparse.Namespace) -> int:
    train_src, test_src = _sources(args)
    _needs_model(args, (train_src, test_src))
    if args.epochs < 1 or not 0 < args.val_fraction < 1 or min(args.lrs) <= 0:
        raise ValueError("--epochs must be >= 1, --val-fraction in (0, 1) and every --lrs value positive")
    cached = args.fast or is_feature_file(train_src)
    provider = FeatureProvider(args)
    rep, stored = _linear_representation(args, provider, train_src)
    device = device_from_args(args)
    start = time.perf_counter()
    if cached:
        data = _cached_linear_data(args, provider, (train_src, test_src), rep, stored, device)
    else:
        data = _augmented_linear_data(args, provider, (train_src, test_src), rep, device)
    result, sweep_test, test_acc, n_train = _sweep_and_refit(args, data)
    if result.best_at_edge:
        log.warning(
            "the best learning rate %g is at the edge of the sweep %s; extend --lrs beyond it",
            result.best_lr,
            args.lrs,
        )
    results: dict[str, Any] = {
        "test": test_acc,
        "refit": args.refit,
        "test_sweep_head": sweep_test,  # the chosen head of the sweep, trained without the held-out share
        "best_lr": result.best_lr,
        "val_top1": {f"lr={lr:g}": acc for lr, acc in zip(result.lrs, result.val_top1, strict=True)},
        "representation": rep,
        "mode": "cached features" if cached else "augmented",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "train_images": n_train,
        "val_images": len(data.val),
        "test_images": len(data.test),
        "classes": len(data.classes),
        "seconds": time.perf_counter() - start,
        **_common_results(provider, data.described_by),
    }
    write_results(results, args.output, f"linear probe on {test_src}")
    return 0
