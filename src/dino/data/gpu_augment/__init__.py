"""DINO's multi-crop augmentation on batched tensors, with per-sample random parameters (CPU or GPU).

:class:`BatchMultiCrop` is the tensor twin of :class:`dino.data.transforms.MultiCropAugmentation`: it
takes a whole batch of decoded uint8 images (on the GPU, straight from the decoder) and returns the same
``[global_1, global_2, local_1, ..., local_n]`` list of normalised batches that
:func:`~dino.data.datasets.collate_skipping_bad` builds from the CPU pipeline, so the training loop can use
either. Every random parameter is drawn per sample from the distribution the CPU pipeline draws it from,
on the generator's device: the data path draws on the CPU, so a GPU batch only receives the parameters
(a few host-to-device copies) and runs the pixel work; nothing is read back from the device.

How each step matches the PIL/torchvision reference, and where it deliberately differs:

* Random-resized crop: :func:`sample_crop_boxes` is torchvision's ``RandomResizedCrop.get_params`` (ten
  attempts, then a centred crop clamped to the ratio range), run for the whole batch at once.
* Crop + bicubic resize + flip are one separable resampling ``W_y · image · W_xᵀ`` with per-sample
  matrices holding PIL's antialiased bicubic weights (a = -0.5, support widened by the downscale factor,
  renormalised at the crop border); a flip reverses the rows of ``W_x``. Two batched matmuls do the pixel
  work for any mix of image sizes (images are zero-padded to a common size; the weights never reach the
  padding). The horizontal pass runs first and is clipped to [0, 1] before the vertical one, as in PIL's
  resampler (which also rounds to 8 bits in between; for some shapes the installed Pillow runs the
  vertical pass first, which changes only pixels where the intermediate clips: high-contrast edges).
* Colour jitter, grayscale and solarize follow torchvision's tensor semantics (contrast blends with the
  mean of the grayscale image, hue rotates in HSV), with the ITU-R 601-2 luma weights PIL uses. The four
  jitter operations run in a random order per sample.
* Gaussian blur with per-sample sigma is PIL's own approximation (what the CPU pipeline's
  ``ImageFilter.GaussianBlur(radius=sigma)`` computes): three extended box blurs per direction whose
  combined variance is sigma², edge pixels repeated at the border. A sampled Gaussian would blur visibly
  less than PIL for small sigma (at sigma 0.3 its taps at +-1 weigh 0.4 % instead of PIL's 4.5 %).
  :func:`gaussian_blur` (torchvision's sampled kernel) is kept for comparison.
* Everything is computed in float32 without PIL's rounding to 8 bits after each step.

The package is split by concern: :mod:`.crop_boxes` (random-resized-crop boxes), :mod:`.resampling`
(crop + resize + flip), :mod:`.colour`, :mod:`.blur` and :mod:`.multicrop` (:class:`BatchMultiCrop`
and the planning of its random parameters); :mod:`.devices` moves small tensors to the batch's device.
Its settings are a :class:`~dino.data.multicrop_spec.MultiCropSpec`, as for the PIL pipeline.
"""

from dino.data.gpu_augment.blur import (
    box_blur_reach,
    extended_box_kernels,
    gaussian_blur,
    gaussian_kernels,
    pil_gaussian_blur,
    separable_filter,
)
from dino.data.gpu_augment.colour import (
    LUMA_WEIGHTS,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    rgb_to_grayscale,
    solarize,
)
from dino.data.gpu_augment.crop_boxes import CropBoxes, sample_crop_boxes
from dino.data.gpu_augment.devices import to_device
from dino.data.gpu_augment.multicrop import BatchMultiCrop, ViewParameters, ViewRecipe
from dino.data.gpu_augment.resampling import (
    resampling_matrices,
    resized_crop_runs,
    resized_crops,
    same_size_runs,
)

__all__ = [
    "LUMA_WEIGHTS",
    "BatchMultiCrop",
    "CropBoxes",
    "ViewParameters",
    "ViewRecipe",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "box_blur_reach",
    "extended_box_kernels",
    "gaussian_blur",
    "gaussian_kernels",
    "pil_gaussian_blur",
    "resampling_matrices",
    "resized_crop_runs",
    "resized_crops",
    "rgb_to_grayscale",
    "same_size_runs",
    "sample_crop_boxes",
    "separable_filter",
    "solarize",
    "to_device",
]
