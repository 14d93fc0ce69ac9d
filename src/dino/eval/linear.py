"""Linear probe on frozen features, with the learning-rate sweep done in one training run.

The paper's protocol: a frozen backbone, a linear classifier (no batch norm) on the last-4 [CLS] tokens for
ViT-S (last [CLS] + mean patch token for ViT-B), SGD with momentum 0.9, no weight decay, a cosine schedule,
random-resized-crop + flip during training and a centre crop at test. The paper sweeps the learning rate;
:class:`MultiLinearHeads` trains one head per learning rate on the same features of the same forward pass,
so the sweep costs about one run. The learning rate is chosen on a validation split carved out of the
training set (stratified, seeded), never on the test set.

Two modes: *augmented* (the protocol: a forward pass per augmented batch and epoch) and *cached* (features
computed once without augmentation, e.g. from ``dino extract`` files; much faster, a little less accurate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dino.data.datasets import collate_skipping_bad
from dino.eval.features import Representation, compute_representations, show_progress
from dino.eval.knn import topk_hits
from dino.eval.lowshot import shuffled_class_members

DEFAULT_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
"""Learning rates swept by default, for a batch of 256 (scaled linearly with the batch size)."""


class MultiLinearHeads(nn.Module):
    """One linear classifier per learning rate, all reading the same features.

    The summed loss gives each head exactly the gradient of its own loss (the heads share no parameter),
    and :meth:`param_groups` gives each head its own learning rate: training all heads together equals
    training each alone, for the cost of one feature pass.
    """

    def __init__(self, in_dim: int, num_classes: int, lrs: Sequence[float]) -> None:
        super().__init__()
        if not lrs or min(lrs) <= 0:
            raise ValueError(f"learning rates must be positive, got {list(lrs)}")
        self.lrs = [float(lr) for lr in lrs]
        heads = [nn.Linear(in_dim, num_classes) for _ in self.lrs]
        for head in heads:
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)
        self.heads = nn.ModuleList(heads)

    def forward(self, features: Tensor) -> Tensor:
        """Logits of every head: [num_heads, B, num_classes]."""
        return torch.stack([head(features) for head in self.heads])

    def param_groups(self, lr_scale: float = 1.0) -> list[dict]:
        """One SGD parameter group per head, at ``lr · lr_scale``."""
        return [
            {"params": list(h.parameters()), "lr": lr * lr_scale}
            for h, lr in zip(self.heads, self.lrs, strict=True)
        ]

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """Sum over heads of each head's mean cross-entropy."""
        heads, batch, classes = logits.shape
        per_sample = F.cross_entropy(logits.reshape(-1, classes), targets.repeat(heads), reduction="none")
        return per_sample.view(heads, batch).mean(dim=1).sum()


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train, val) indices: ``round(val_fraction · n_c)`` of each class c go to validation.

    A class of two or more images gives at least one to validation and keeps at least one for training.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for members in shuffled_class_members(labels, seed):
        n_val = min(max(1, round(val_fraction * members.numel())), members.numel() - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    val_idx = torch.cat(val).sort().values
    if val_idx.numel() == 0:
        raise ValueError(
            "the training set is too small to carve out a validation split (one image per class)"
        )
    return torch.cat(train).sort().values, val_idx


def train_transform(crop_size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The protocol's training augmentation: random-resized crop (bicubic) and horizontal flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(crop_size, interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(list(mean), list(std)),
        ]
    )


class AugmentedFeatures:
    """Feature batches of a frozen backbone over freshly augmented images, one pass per epoch."""

    def __init__(
        self,
        backbone: nn.Module,
        dataset: Dataset,
        representation: str,
        device: torch.device,
        batch_size: int,
        num_workers: int = 0,
        autocast_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        self.backbone, self.device, self.autocast_dtype = backbone, device, autocast_dtype
        self.rep = Representation.parse(representation)
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(dataset) > batch_size,  # type: ignore[arg-type]  # Dataset declares no __len__
            num_workers=num_workers,
            collate_fn=collate_skipping_bad,
            generator=self.generator,
            pin_memory=device.type == "cuda",
        )

    def __len__(self) -> int:
        return len(self.loader)

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.backbone.eval()
        for images, labels, _ in self.loader:
            if len(labels) == 0:
                continue
            images = images.to(self.device, non_blocking=True)
            with torch.autocast(
                self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
            ):
                feats = compute_representations(self.backbone, images, [self.rep])[self.rep.name]
            yield feats.float(), labels.to(self.device)


class CachedFeatures:
    """Shuffled mini-batches of precomputed features (the fast mode: no augmentation)."""

    def __init__(
        self, features: Tensor, labels: Tensor, device: torch.device, batch_size: int, seed: int = 0
    ):
        self.features, self.labels = features.to(device), labels.to(device).long()
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.features.shape[0]
        return max(1, n // self.batch_size)  # drop the incomplete last batch, as the loader does

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.features.shape[0]
        order = torch.randperm(n, generator=self.generator).to(self.features.device)
        size = self.batch_size if n > self.batch_size else n
        for i in range(len(self)):
            idx = order[i * size : (i + 1) * size]
            yield self.features[idx], self.labels[idx]


@dataclass
class SweepResult:
    """Validation accuracy of every head, the chosen learning rate, and that head's test accuracy."""

    lrs: list[float]  # as given (for batch 256)
    val_top1: list[float]
    best_index: int
    test_top1: float
    test_top5: float

    @property
    def best_lr(self) -> float:
        return self.lrs[self.best_index]

    @property
    def best_at_edge(self) -> bool:
        """Whether the chosen learning rate is the smallest or largest swept (the sweep may be too narrow)."""
        return len(self.lrs) > 1 and self.best_lr in (min(self.lrs), max(self.lrs))


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_heads(
    heads: MultiLinearHeads,
    batches: Iterable[tuple[Tensor, Tensor]],
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    momentum: float = 0.9,
    on_epoch: Callable[[int, float], None] | None = None,
) -> None:
    """SGD with momentum, no weight decay, lr scaled by batch/256 and decayed by a per-step cosine."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    optimizer = torch.optim.SGD(heads.param_groups(batch_size / 256), momentum=momentum, weight_decay=0.0)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total))
    from tqdm import tqdm

    heads.train()
    for epoch in tqdm(range(epochs), desc="linear", disable=not show_progress(), leave=False):
        running, count = 0.0, 0
        for features, labels in batches:
            loss = heads.loss(heads(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running, count = running + loss.item(), count + 1
        if on_epoch is not None:
            on_epoch(epoch, running / max(count, 1) / len(heads.heads))
    heads.eval()


@torch.no_grad()
def head_accuracies(
    heads: MultiLinearHeads, features: Tensor, labels: Tensor, chunk: int = 4096
) -> list[tuple[float, float]]:
    """(top-1, top-5) percent of every head on a feature tensor, counted chunk by chunk (the logits of
    all heads for a whole evaluation set would take heads × N × C floats: gigabytes on ImageNet)."""
    device = next(heads.parameters()).device
    hits = torch.zeros(len(heads.heads), 2, dtype=torch.long)
    for i in range(0, features.shape[0], chunk):
        chunk_labels = labels[i : i + chunk].to(device)
        for h, head_logits in enumerate(heads(features[i : i + chunk].to(device))):
            hits[h] += torch.tensor(topk_hits(head_logits, chunk_labels))
    total = max(features.shape[0], 1)
    return [(100.0 * top1 / total, 100.0 * top5 / total) for top1, top5 in hits.tolist()]


def select_and_test(
    heads: MultiLinearHeads,
    val_features: Tensor,
    val_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
) -> SweepResult:
    """Pick the head with the best validation top-1 (the smaller lr on ties) and report its test accuracy."""
    val = [top1 for top1, _ in head_accuracies(heads, val_features, val_labels)]
    best = max(range(len(val)), key=lambda i: (val[i], -heads.lrs[i]))
    test = head_accuracies(heads, test_features, test_labels)[best]
    return SweepResult(list(heads.lrs), val, best, test[0], test[1])


def sweep_on_cached(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    device: torch.device | None = None,
    seed: int = 0,
) -> SweepResult:
    """The fast mode: the whole sweep on precomputed features."""
    device = device or torch.device("cpu")
    with torch.random.fork_rng(devices=[]):  # reproducible from ``seed``, the caller's RNG untouched
        torch.manual_seed(seed)
        heads = MultiLinearHeads(train_features.shape[1], num_classes, lrs).to(device)
        batches = CachedFeatures(train_features.float(), train_labels, device, batch_size, seed)
        train_heads(heads, batches, epochs, len(batches), min(batch_size, train_features.shape[0]), momentum)
    return select_and_test(heads, val_features.float(), val_labels, test_features.float(), test_labels)


def sweep_augmented(
    backbone: nn.Module,
    train_dataset: Dataset,
    train_indices: Tensor,
    representation: str,
    feature_dim: int,
    val_features: Tensor,
    val_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    device: torch.device,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> SweepResult:
    """The protocol: heads trained on features of augmented crops (``train_dataset`` applies them)."""
    subset = Subset(train_dataset, train_indices.tolist())
    with torch.random.fork_rng(devices=[]):  # initialisation and crops reproducible from ``seed``
        torch.manual_seed(seed)
        batches = AugmentedFeatures(
            backbone, subset, representation, device, batch_size, num_workers, autocast_dtype, seed
        )
        heads = MultiLinearHeads(feature_dim, num_classes, lrs).to(device)
        train_heads(heads, batches, epochs, len(batches), min(batch_size, len(subset)), momentum)
    return select_and_test(heads, val_features, val_labels, test_features, test_labels)
