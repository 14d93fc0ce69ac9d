"""The DINO loss: cross-entropy between the centred, sharpened teacher and the student, over view pairs.

For teacher outputs g_t(x) on the global views and student outputs g_s(x') on all views,

    P_t = softmax((g_t - c) / tau_t),   P_s = softmax(g_s / tau_s),
    L   = mean over pairs (x, x'), x global, x' any view, x' != x, of  - sum_k P_t[k] log P_s[k],

and the center c follows an EMA (rate ``center_momentum``) of the batch mean of teacher outputs,
averaged over all processes. The paper's ablations of the teacher normalisation (no centering,
softmax over the batch, Sinkhorn-Knopp) are available through ``teacher_norm``; tau_t = 0 gives one-hot
targets (the argmax, the sharpening table's first column); ``kind="mse"`` replaces the cross-entropy by
the squared distance between L2-normalised outputs (BYOL's loss, the paper's "MSE" rows): no temperature,
no sharpening, the teacher centred first only with ``teacher_norm="centering"``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

TeacherNorm = Literal["centering", "sinkhorn", "batch_softmax", "none"]
LossKind = Literal["cross_entropy", "mse"]


def _all_reduce_mean(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, n_iters: int = 3) -> Tensor:
    """Equipartitioned soft assignments (rows sum to 1) from teacher logits already divided by tau."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # One shift for the global batch (a process's own maximum would weigh the processes' columns unequally
    # in the first row sums, so the targets would depend on the number of processes).
    shift = logits.max().reshape(1)
    if world > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - shift).t()  # [K, B]
    batch = q.shape[1] * world
    k = q.shape[0]
    total = _all_reduce_mean(q.sum().reshape(1)) * world
    q /= total
    for _ in range(n_iters):
        row = _all_reduce_mean(q.sum(dim=1, keepdim=True)) * world
        q /= row
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


class DINOLoss(nn.Module):
    """Cross-entropy between teacher (global views) and student (all views); keeps the center as a buffer."""

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        teacher_norm: TeacherNorm = "centering",
        kind: LossKind = "cross_entropy",
    ) -> None:
        super().__init__()
        if teacher_norm not in ("centering", "sinkhorn", "batch_softmax", "none"):
            raise ValueError(
                f"teacher_norm must be centering, sinkhorn, batch_softmax or none, got {teacher_norm!r}"
            )
        if kind not in ("cross_entropy", "mse"):
            raise ValueError(f"loss kind must be cross_entropy or mse, got {kind!r}")
        if kind == "mse" and teacher_norm not in ("centering", "none"):
            raise ValueError(f"the mse loss takes teacher_norm centering or none, not {teacher_norm!r}")
        self.kind = kind
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_norm = teacher_norm
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """Target distribution P_t from raw teacher logits (no gradient)."""
        logits = teacher_output.detach().float()
        if teacher_temp == 0:  # the limit of tau_t -> 0: all the mass on the largest (centred) logit
            if self.teacher_norm not in ("centering", "none"):
                raise ValueError(
                    f"teacher temperature 0 (argmax) needs centering or none, not {self.teacher_norm}"
                )
            shifted = logits - self.center if self.teacher_norm == "centering" else logits
            return F.one_hot(shifted.argmax(dim=-1), self.out_dim).to(logits.dtype)
        if self.teacher_norm == "centering":
            return F.softmax((logits - self.center) / teacher_temp, dim=-1)
        if self.teacher_norm == "sinkhorn":
            return sinkhorn_knopp(logits / teacher_temp)
        if self.teacher_norm == "batch_softmax":
            # Normalise over the batch, then make each row a distribution over prototypes.
            probs = F.softmax(logits / teacher_temp, dim=0)
            return probs / probs.sum(dim=-1, keepdim=True)
        return F.softmax(logits / teacher_temp, dim=-1)

    def forward(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        teacher_temp: float,
        n_global: int = 2,
        update_center: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss over all (teacher global view, other student view) pairs, then the center update.

        ``student_output`` is [n_views * B, K] and ``teacher_output`` [n_global * B, K], ordered view by view
        as :class:`~dino.models.multicrop.MultiCropWrapper` returns them. Returns the loss and detached
        diagnostics: teacher entropy and KL(teacher ‖ student), averaged over the same pairs. With
        ``update_center=False`` the caller updates the center itself (e.g. only after a finite loss).
        """
        if teacher_output.shape[0] % n_global or teacher_output.shape[0] == 0:
            raise ValueError(
                f"teacher_output has {teacher_output.shape[0]} rows, not a multiple of n_global={n_global} "
                "views of one batch"
            )
        batch = teacher_output.shape[0] // n_global
        if student_output.shape[0] % batch or student_output.shape[-1] != teacher_output.shape[-1]:
            raise ValueError(
                f"student_output is {tuple(student_output.shape)}: it needs whole views of the teacher's batch of "
                f"{batch} ({n_global} view(s) in teacher_output {tuple(teacher_output.shape)}) and the same K"
            )
        n_views = student_output.shape[0] // batch
        if n_global * n_views - min(n_global, n_views) == 0:
            raise ValueError("the DINO loss needs at least two views (no pair of distinct views was given)")
        if self.kind == "mse":
            with torch.no_grad():  # the entropy and KL of the same outputs as softmaxes: diagnostics only
                _, stats = self._cross_entropy(
                    student_output, teacher_output, teacher_temp, n_global, n_views
                )
            loss = self._mse(student_output, teacher_output, n_global, n_views)
        else:
            loss, stats = self._cross_entropy(student_output, teacher_output, teacher_temp, n_global, n_views)
        if update_center:
            self.update_center(teacher_output)
        return loss, stats

    def _cross_entropy(
        self, student_output: Tensor, teacher_output: Tensor, teacher_temp: float, n_global: int, n_views: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean over pairs of -P_t . log P_s, with the teacher entropy and KL over the same pairs."""
        batch = teacher_output.shape[0] // n_global
        log_p = F.log_softmax(student_output.float() / self.student_temp, dim=-1).view(n_views, batch, -1)
        p_t = self.teacher_probs(teacher_output, teacher_temp).view(n_global, batch, -1)
        # Teacher view t is paired with every student view s != t. Summing the student log-probabilities
        # over the views once, then removing view t's own, gives all pairs of one teacher view in one
        # product: -sum_{s != t} p_t . log p_s = -p_t . (sum_s log p_s - log p_t).
        paired = min(n_global, n_views)  # teacher views that have a student view of their own to skip
        n_pairs = n_global * n_views - paired
        summed = log_p.sum(dim=0, keepdim=True)
        others = summed - log_p[:paired]
        if n_global > paired:
            others = torch.cat([others, summed.expand(n_global - paired, -1, -1)])
        cross_entropy = -(p_t * others).sum(dim=-1).mean(dim=-1)  # [n_global]: summed over its pairs
        total = cross_entropy.sum()
        with torch.no_grad():
            entropies = -(p_t * torch.log(p_t.clamp_min(1e-12))).sum(dim=-1).mean(dim=-1)  # [n_global]
            pairs_of = torch.full_like(entropies, n_views)
            pairs_of[:paired] -= 1
            kl = cross_entropy.detach().sum() - (pairs_of * entropies).sum()
            entropy = entropies.mean()
        return total / n_pairs, {"teacher_entropy": entropy, "kl": kl / n_pairs}

    def _mse(self, student_output: Tensor, teacher_output: Tensor, n_global: int, n_views: int) -> Tensor:
        """The mean over the same pairs of ||s/|s| - t/|t|||^2 = 2 - 2 cos(s, t), the teacher centred first
        with ``teacher_norm="centering"``."""
        batch = teacher_output.shape[0] // n_global
        target = teacher_output.detach().float()
        if self.teacher_norm == "centering":
            target = target - self.center
        t = F.normalize(target, dim=-1).view(n_global, batch, -1)
        s = F.normalize(student_output.float(), dim=-1).view(n_views, batch, -1)
        paired = min(n_global, n_views)
        n_pairs = n_global * n_views - paired
        summed = s.sum(dim=0, keepdim=True)
        others = summed - s[:paired]
        if n_global > paired:
            others = torch.cat([others, summed.expand(n_global - paired, -1, -1)])
        cosines = (t * others).sum(dim=-1).mean(dim=-1).sum()  # summed over the pairs, mean over the batch
        return 2.0 - 2.0 * cosines / n_pairs

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor, skip: Tensor | None = None) -> None:
        """c ← m·c + (1 − m)·mean(teacher outputs over the global batch); left as it is where the 0-dim
        ``skip`` flag (on the device, so no host synchronisation) is set. The mse loss without centering
        has no center: it stays at zero."""
        if self.kind == "mse" and self.teacher_norm != "centering":
            return
        batch_center = _all_reduce_mean(teacher_output.detach().float().mean(dim=0, keepdim=True))
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(updated if skip is None else torch.where(skip.bool(), self.center, updated))

    @property
    def uniform_entropy(self) -> float:
        """ln K: the teacher entropy of a collapse to the uniform distribution."""
        return math.log(self.out_dim)
