"""Skip the steps whose loss is not finite, without a host synchronisation per step where possible.

A step with a NaN or infinite loss must change nothing: no optimiser update, no teacher update, no center
update. Reading the loss on the host every step to decide would stall an accelerator's queue once per
step, so where the optimiser can skip on its own — the fused AdamW / SGD kernels take a ``found_inf``
flag, as GradScaler uses them — the decision stays on the device: the flag masks the optimiser, the EMA
teacher and the center, and the host reads the flags only every few steps (log points, checkpoints, epoch
ends) to report the skipped steps and to stop a run that keeps diverging. Otherwise (LARS, the fp16 grad
scaler, the teacher ablations) the flag is read every step, as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dino.train.distributed import any_process, max_over_processes_


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses: the run stops, its last good checkpoint kept."""


class NonFiniteGuard:
    """Decides, step by step, whether the updates run; counts and reports skipped steps.

    ``on_device``: the fused optimiser reads ``optimizer.found_inf``; ``mask`` (a 0-dim float tensor,
    1 = skip) is to be passed to the teacher and center updates. Otherwise ``admit`` answers on the host.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        max_bad_steps: int,
        on_bad_step: Callable[[int, float, int], None],
        divergence_message: Callable[[int], str],
        grad_scaler_enabled: bool = False,
        teacher_mode: str = "momentum",
    ) -> None:
        self.optimizer = optimizer
        self.device = device
        self.max_bad_steps = max_bad_steps
        self.on_bad_step = on_bad_step
        self.divergence_message = divergence_message
        self.on_device = (
            getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(group.get("fused") for group in optimizer.param_groups)
            and not grad_scaler_enabled
            and teacher_mode == "momentum"
        )
        self.mask: torch.Tensor | None = None
        self.consecutive = 0  # on the host; up to date after ``poll``
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def admit(self, iteration: int, loss: torch.Tensor) -> bool:
        """False: skip this step's updates (decided on the host now). True: run them (masked on the device
        when ``on_device``)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if not self.on_device:
            if any_process(bad, self.device):  # every process skips the same steps
                self._record(iteration, float(loss.detach()))
                return False
            self.consecutive = 0
            return True
        max_over_processes_(bad)  # every process skips the same steps, decided on the device
        self.mask = bad
        # read by the fused kernel (as GradScaler sets it): a flagged step changes nothing
        self.optimizer.found_inf = bad  # type: ignore[attr-defined]  # not in Optimizer's stub
        self._pending.append((iteration, bad, loss.detach()))
        return True

    def poll(self) -> int:
        """Read the flags queued since the last call (one host synchronisation), report the skipped steps
        and stop a run that keeps diverging. Returns the current number of consecutive bad steps."""
        if self._pending:
            flags = torch.stack([bad for _, bad, _ in self._pending]).cpu().tolist()
            for (iteration, _, loss), bad in zip(self._pending, flags, strict=True):
                if bad:
                    self._record(iteration, float(loss))
                else:
                    self.consecutive = 0
            self._pending = []
        return self.consecutive

    def _record(self, iteration: int, loss: float) -> None:
        self.consecutive += 1
        self.on_bad_step(iteration, loss, self.consecutive)
        if self.consecutive > self.max_bad_steps:
            raise TrainingDiverged(self.divergence_message(self.consecutive))


class BatchNormStatsKeeper:
    """Puts back the BatchNorm running statistics of a skipped step.

    The forward passes (student's and teacher's) update them before the loss is known to be finite, so a
    step whose outputs are NaN would leave NaN statistics behind.
    :meth:`save` before the forward passes; :meth:`restore` after the guard's decision: unconditionally
    when the host decided to skip, or where the device flag says so (no host synchronisation). Each
    costs a few kernels: the statistics are gathered into one flat tensor per dtype.
    """

    def __init__(self, *models: torch.nn.Module) -> None:
        buffers = [
            b
            for model in models
            for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self._groups = [
            [b for b in buffers if b.dtype == dtype] for dtype in dict.fromkeys(b.dtype for b in buffers)
        ]
        self._sizes = [[b.numel() for b in group] for group in self._groups]
        self._saved: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self._groups)

    def save(self) -> None:
        self._saved = [torch.cat([b.reshape(-1) for b in group]) for group in self._groups]

    def restore(self, skip: torch.Tensor | None = None) -> None:
        """Back to the saved values: all of them (``skip`` None), or where the 0-dim flag ``skip`` is 1."""
        for group, sizes, saved in zip(self._groups, self._sizes, self._saved, strict=True):
            if skip is not None:
                current = torch.cat([b.reshape(-1) for b in group])
                saved = torch.where(skip.bool(), saved, current)
            parts = saved.split(sizes)
            torch._foreach_copy_(group, [part.view_as(b) for part, b in zip(parts, group, strict=True)])
