"""Per-sample blurs of a batch: PIL's Gaussian approximation (extended box blurs), a sampled Gaussian for
comparison, and the separable depthwise filter both run on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "box_blur_reach",
    "extended_box_kernels",
    "gaussian_blur",
    "gaussian_kernels",
    "pil_gaussian_blur",
    "separable_filter",
]


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Sampled, normalised 1-D Gaussian kernels [B, 2 * radius + 1] for per-sample ``sigma`` [B]
    (torchvision's ``gaussian_blur`` kernel); sigma 0 gives the identity kernel."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.to(torch.float32)[:, None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    kernels = torch.exp(-0.5 * (x[None, :] / safe) ** 2)
    identity = (x == 0).to(torch.float32).expand_as(kernels)
    kernels = torch.where(s > 0, kernels, identity)
    return kernels / kernels.sum(dim=1, keepdim=True)


def _box_split(sigma: Tensor, passes: int) -> tuple[Tensor, Tensor]:
    """Integer part ``l`` and full radius ``r`` of the extended box whose ``passes``-fold repetition has
    variance sigma² (Gwosdek et al. 2011, the formula of PIL's ``GaussianBlur``)."""
    var = sigma**2 / passes
    whole = torch.floor((torch.sqrt(12.0 * var + 1.0) - 1.0) / 2.0)
    frac = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * var) / (6.0 * (var - (whole + 1.0) ** 2))
    return whole, whole + frac


def box_blur_reach(max_sigma: float, passes: int = 3) -> int:
    """Half-width in pixels of one extended-box pass for every sigma up to ``max_sigma``: the integer part
    of :func:`_box_split`'s box, plus one, computed on the host (no tensor, no device read)."""
    var = float(max_sigma) ** 2 / passes
    return math.floor((math.sqrt(12.0 * var + 1.0) - 1.0) / 2.0) + 1


def extended_box_kernels(sigma: Tensor, reach: int, passes: int = 3) -> Tensor:
    """One pass of PIL's Gaussian approximation per sample: [B, 2 * reach + 1] weights equal to
    ``1 / (2 r + 1)`` within ``l = floor(r)`` of the centre and the remainder split over the two pixels
    at distance ``l + 1``; sigma 0 gives the identity. ``reach`` must be at least ``l + 1``
    (:func:`box_blur_reach` of the largest sigma)."""
    whole, radius = _box_split(sigma.to(torch.float64), passes)
    whole, radius = whole[:, None], radius[:, None]
    inner = 1.0 / (2.0 * radius + 1.0)
    outer = (1.0 - (2.0 * whole + 1.0) * inner) / 2.0
    distance = torch.arange(-reach, reach + 1, device=sigma.device, dtype=torch.float64).abs()[None, :]
    kernels = torch.where(distance <= whole, inner, torch.where(distance == whole + 1.0, outer, 0.0))
    return kernels.to(torch.float32)


def _border_indices(size: int, radius: int, mode: str, device: torch.device) -> Tensor:
    """Source index of every position of a line padded by ``radius`` on both sides with a mirror:
    ``symmetric`` mirrors including the edge pixel (``c b a | a b c | c b a``); ``reflect`` mirrors
    without it (``c b | a b c | b a``, torch's and torchvision's). The mirrors fold repeatedly, so any
    radius works for any size. (``replicate``, PIL's box blur edge, is ``F.pad``'s own mode.)
    """
    positions = torch.arange(-radius, size + radius, device=device)
    if mode == "symmetric":
        period = 2 * size
        folded = positions.remainder(period)
        return torch.where(folded < size, folded, period - 1 - folded)
    if mode == "reflect":
        if size == 1:
            return torch.zeros_like(positions)
        period = 2 * (size - 1)
        folded = positions.remainder(period)
        return torch.where(folded < size, folded, period - folded)
    raise ValueError(f"mirror padding must be 'symmetric' or 'reflect', got {mode!r}")


def separable_filter(images: Tensor, kernels: Tensor, padding: str = "replicate", passes: int = 1) -> Tensor:
    """Convolve each image of a [B, C, H, W] batch with its own symmetric 1-D kernel (``kernels`` [B, K],
    K odd) along the width and then the height, ``passes`` times each, padding the border every pass.

    One depthwise convolution over the B·C channels per pass, so the whole batch is one kernel launch.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    if kernels.dim() != 2 or kernels.shape[0] != batch or kernels.shape[1] % 2 == 0:
        raise ValueError(f"kernels must have shape [{batch}, odd length], got {tuple(kernels.shape)}")
    if padding not in ("replicate", "symmetric", "reflect"):
        raise ValueError(f"padding must be 'replicate', 'symmetric' or 'reflect', got {padding!r}")
    taps = kernels.shape[1]
    reach = taps // 2
    weight = kernels.to(images.dtype).repeat_interleave(channels, dim=0)
    x = images.reshape(1, batch * channels, height, width)
    if padding == "replicate":  # the edge pixel repeated (PIL's box blur): torch's own padding kernel

        def pad(x: Tensor, dim: int) -> Tensor:
            return F.pad(x, (reach, reach, 0, 0) if dim == 3 else (0, 0, reach, reach), mode="replicate")

    else:  # the mirrors: a gather of precomputed source indices
        columns = _border_indices(width, reach, padding, images.device)
        rows = _border_indices(height, reach, padding, images.device)

        def pad(x: Tensor, dim: int) -> Tensor:
            return x.index_select(dim, columns if dim == 3 else rows)

    for _ in range(passes):
        x = F.conv2d(pad(x, 3), weight.view(-1, 1, 1, taps), groups=batch * channels)
    for _ in range(passes):
        x = F.conv2d(pad(x, 2), weight.view(-1, 1, taps, 1), groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def gaussian_blur(images: Tensor, sigma: Tensor, radius: int, padding: str = "reflect") -> Tensor:
    """Blur each image of a batch with a sampled Gaussian of its own ``sigma`` ([B]; 0 = unchanged),
    ``2 * radius + 1`` taps: torchvision's ``gaussian_blur`` with per-sample sigma."""
    return separable_filter(images, gaussian_kernels(sigma, radius), padding)


def pil_gaussian_blur(
    images: Tensor, sigma: Tensor, max_sigma: float | None = None, passes: int = 3
) -> Tensor:
    """Blur each image of a batch as PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` does, per-sample sigma.

    PIL approximates the Gaussian by ``passes`` extended box blurs whose combined variance is exactly
    sigma², each pass with the edge pixel repeated at the border; the same passes run here, in float
    (PIL rounds to 8 bits after each). Give ``max_sigma`` (a bound on ``sigma``) to avoid reading the
    largest sigma back from the device.
    """
    if max_sigma is None:
        max_sigma = float(sigma.max()) if sigma.numel() else 0.0
    reach = box_blur_reach(max_sigma, passes)
    return separable_filter(images, extended_box_kernels(sigma, reach, passes), "replicate", passes)
