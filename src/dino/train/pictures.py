"""Pictures of a run for the sinks that show them (TensorBoard, W&B): the augmented crops the network is
trained on, at the start, and the teacher's attention on one fixed image at every k-NN point.

Each picture is a uint8 RGB array [N, H, W, 3]; the attention picture is a matplotlib figure with titles
and a colour bar, so that it reads on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dino.eval.attention import cls_attention, upsample
from dino.models.vision_transformer import VisionTransformer


def to_pixels(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised images [N, 3, H, W] back to uint8 RGB [N, H, W, 3]."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * s + m).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def crop_pictures(
    crops: Sequence[Tensor], mean: Sequence[float], std: Sequence[float], n: int
) -> dict[str, np.ndarray]:
    """The first ``n`` images' crops: ``crops/global`` (view 1 of each, then view 2 of each) and, with
    multi-crop, ``crops/local`` (the first local view of each)."""
    shown = {"crops/global": to_pixels(torch.cat([crops[0][:n], crops[1][:n]]), mean, std)}
    if len(crops) > 2:
        shown["crops/local"] = to_pixels(crops[2][:n], mean, std)
    return shown


@torch.no_grad()
def attention_picture(
    backbone: VisionTransformer, image: Tensor, mean: Sequence[float], std: Sequence[float], title: str
) -> np.ndarray:
    """The image beside the mean over heads of the last block's [CLS] attention to its patches, as a
    [1, H, W, 3] rendering of a titled figure with a colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        attention = cls_attention(backbone, image[None].to(device))[0]  # [heads, h, w]
    finally:
        backbone.train(was_training)
    pixels = to_pixels(image[None], mean, std)[0]
    heat = upsample(attention, (pixels.shape[0], pixels.shape[1])).mean(dim=0).cpu().numpy()
    fig = Figure(figsize=(6.4, 3.2), dpi=80, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(pixels)
    left.set_title("image")
    shown = right.imshow(heat, cmap="inferno")
    right.set_title(f"[CLS] attention, mean of {attention.shape[0]} heads")
    for ax in (left, right):
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
    fig.colorbar(shown, ax=right, label="attention weight")
    fig.suptitle(title)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[None, :, :, :3].copy()
