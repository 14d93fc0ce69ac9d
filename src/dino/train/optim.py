"""Optimisers for DINO: AdamW (ViT recipe), SGD and LARS (ResNet-50 recipe); no decay on biases and norms."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights that get weight decay, and biases / norm parameters (ndim ≤ 1) that do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), skipping biases and norms (ndim ≤ 1)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        """One update in a few multi-tensor kernels per group (a ResNet-50 has ~160 parameter tensors: a
        per-tensor loop would launch ~10 kernels for each)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            adapted = [i for i, p in enumerate(params) if p.ndim > 1]  # biases and norms: plain SGD
            if adapted:
                weights = [params[i] for i in adapted]
                grads = [updates[i] for i in adapted]
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, weights, alpha=group["weight_decay"])
                param_norms = torch.stack(torch._foreach_norm(weights))
                update_norms = torch.stack(torch._foreach_norm(grads))
                trust = torch.where(
                    (param_norms > 0) & (update_norms > 0),
                    group["eta"] * param_norms / update_norms,
                    torch.ones_like(param_norms),
                )
                grads = torch._foreach_mul(grads, list(trust.unbind(0)))
                for i, grad in zip(adapted, grads, strict=True):
                    updates[i] = grad
            buffers = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                buffers.append(state["mu"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def build_optimizer(
    model: nn.Module, name: str, momentum: float = 0.9, fused: bool | None = None
) -> torch.optim.Optimizer:
    """lr and weight decay are set by the schedules at every iteration, so both start at 0 here.

    ``fused`` (AdamW, SGD): one kernel for all parameters — by default wherever PyTorch has it (CUDA and
    the CPU, where PyTorch's own default loops over the tensors: several times slower, measured by
    ``benchmarks/optimizer_step.py``) — which can also skip a step on a device-side flag
    (see :mod:`dino.train.guard`). ``fused=False``: PyTorch's default implementation.
    """
    groups = param_groups(model)
    if fused is None:
        fused = fused_supported(model)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, fused=fused or None)
    if name == "sgd":
        sgd = torch.optim.SGD(groups, lr=0.0, momentum=momentum, fused=fused or None)
        if momentum:
            # Fused SGD fills missing momentum buffers only when all are missing: a parameter whose first
            # gradient comes later than the others' (the head's last layer, frozen for the first epochs)
            # would stop it with a TypeError. Zero buffers from the start give the same updates
            # (the first update of a buffer is then momentum × 0 + grad = grad, as when it is created).
            for group in sgd.param_groups:
                for param in group["params"]:
                    sgd.state[param]["momentum_buffer"] = torch.zeros_like(param)
        return sgd
    if name == "lars":
        return LARS(groups, lr=0.0, momentum=momentum)
    raise ValueError(f"optimizer must be adamw, sgd or lars, got {name!r}")


def load_state_by_name(
    optimizer: torch.optim.Optimizer,
    parameters: Mapping[str, nn.Parameter],
    state: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """Put per-parameter optimiser ``state`` keyed by parameter name into ``optimizer`` (parameters
    without an entry keep theirs); returns the names of the entries for which ``optimizer`` has no
    parameter. PyTorch's own ``load_state_dict`` goes by position, which holds only between two
    optimisers built over the same parameters in the same order."""
    position = {
        id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
    }
    full = optimizer.state_dict()  # indexed in the same order as ``position``
    unused = []
    for name, entry in state.items():
        param = parameters.get(name)
        if param is None or id(param) not in position:
            unused.append(name)
            continue
        full["state"][position[id(param)]] = dict(entry)
    optimizer.load_state_dict(full)
    return unused


def optimizer_state_by_name(
    state_dict: Mapping[str, Any], parameter_names: list[str]
) -> dict[str, dict[str, Any]]:
    """The per-parameter entries of a PyTorch optimiser ``state_dict`` (keyed by position) keyed by
    parameter name instead; ``parameter_names``: the names of the optimiser's parameters, in the order of
    its parameter groups (the order the positions count)."""
    positions = [i for group in state_dict["param_groups"] for i in group["params"]]
    if len(positions) != len(parameter_names):
        raise ValueError(
            f"the optimiser state holds {len(positions)} parameters, the optimiser {len(parameter_names)}"
        )
    name_of = dict(zip(positions, parameter_names, strict=True))
    return {name_of[i]: dict(entry) for i, entry in state_dict["state"].items()}


def fused_supported(model: nn.Module) -> bool:
    try:  # a private helper of PyTorch: fall back to the devices it has listed since 2.4
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cuda", "cpu"}
    params = [p for p in model.parameters() if p.requires_grad]
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients(model: nn.Module, max_norm: float) -> None:
    """Scale each parameter's gradient to norm ≤ ``max_norm`` separately, as the released DINO does
    (per-tensor clipping, unlike ``clip_grad_norm_`` which clips the global norm)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    # coef = min(max_norm / (norm + 1e-6), 1) for every tensor, in a few multi-tensor kernels (no host sync).
    coefs = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, max_norm)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)


def cancel_last_layer_gradients(head: nn.Module) -> None:
    """During the first ``freeze_last_layer`` epochs the head's last layer is not updated."""
    for param in head.get_submodule("last_layer").parameters():
        param.grad = None
