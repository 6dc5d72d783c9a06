"""Training augmentation (albumentations): the original Cerberus pipeline, with its contrast bug fixed.

Shape (applied identically to the image and every label map; labels use nearest-neighbour interpolation,
the image bilinear):

- ``seg``: affine (independent x/y scale 0.9-1.1, translation +-1 %, rotation +-179 deg, shear +-5 deg,
  reflected border), centre crop to ``input_shape`` (448 from the 996 patches), horizontal and vertical flips;
- ``class``: affine (scale 0.9-1.1, shear +-5 deg), a random multiple of 90 deg, centre crop to
  ``input_shape`` (144), flips;
- ``valid``: centre crop only.

Colour (image only, ``seg`` and ``class``): one of Gaussian blur, median blur (kernel 3 or 5) or Gaussian noise
(sigma up to 5 % of 255); then, with probability 0.9 and in random order, hue shift (+-8 OpenCV units),
saturation x(0.8-1.2), brightness +-26 and a contrast x(0.75-1.25) around the mean (the original's contrast
was a no-op); optionally an H&E stain jitter (``stain=True``).

Each call takes a seed, so a sample's augmentation is reproducible whatever the worker or order.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

MODES = ("seg", "class", "valid")


def _colour(stain: bool) -> list:
    ops = [
        A.OneOf([
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.5, 1.5), p=1),
            A.MedianBlur(blur_limit=(3, 5), p=1),
            A.GaussNoise(std_range=(0.0, 0.05), per_channel=True, p=1),
        ], p=1),
        A.SomeOf([
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=0, val_shift_limit=0, p=1),
            A.ColorJitter(brightness=0, contrast=0, saturation=(0.8, 1.2), hue=0, p=1),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0, brightness_by_max=True, p=1),
            A.ColorJitter(brightness=0, contrast=(0.75, 1.25), saturation=0, hue=0, p=1),
        ], n=4, replace=False, p=0.9),
    ]
    if stain:
        ops.append(A.HEStain(method="random_preset", intensity_scale_range=(0.8, 1.2),
                             intensity_shift_range=(-0.1, 0.1), p=0.5))
    return ops


def build(mode: str, input_shape: int, stain: bool = False) -> A.Compose:
    """The albumentations pipeline of one mode (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"augmentation mode must be one of {MODES}, got {mode!r}")
    pad = A.PadIfNeeded(input_shape, input_shape, border_mode=cv2.BORDER_REFLECT_101)
    crop = A.CenterCrop(input_shape, input_shape)
    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    affine = dict(interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                  border_mode=cv2.BORDER_REFLECT_101, p=1)
    if mode == "seg":
        ops = [A.Affine(scale={"x": (0.9, 1.1), "y": (0.9, 1.1)}, translate_percent={"x": (-0.01, 0.01),
                        "y": (-0.01, 0.01)}, rotate=(-179, 179), shear={"x": (-5, 5), "y": (-5, 5)}, **affine),
               pad, crop, *flips, *_colour(stain)]
    elif mode == "class":
        ops = [A.Affine(scale=(0.9, 1.1), shear={"x": (-5, 5), "y": (-5, 5)}, **affine), A.RandomRotate90(p=1),
               pad, crop, *flips, *_colour(stain)]
    else:
        ops = [pad, crop]
    return A.Compose(ops)


class Augmenter:
    """``Augmenter("seg", 448)(image, {"nuclei_inst": m, ...}, seed=k) -> (image, maps)``.

    Label maps keep their dtype and values (nearest neighbour; integer ids up to 2^24 are exact).
    """

    def __init__(self, mode: str, input_shape: int, stain: bool = False):
        self.mode, self.input_shape = mode, input_shape
        self.pipeline = build(mode, input_shape, stain)

    def __call__(self, image: np.ndarray, maps: dict[str, np.ndarray] | None = None, seed: int = 0):
        maps = maps or {}
        names = list(maps)
        dtypes = [maps[n].dtype for n in names]
        self.pipeline.set_random_seed(int(seed))
        masks = [maps[n].astype(np.float32) for n in names]  # OpenCV warps do not take int32
        out = self.pipeline(image=np.ascontiguousarray(image), masks=masks) if masks else self.pipeline(image=image)
        result = {n: np.asarray(m).astype(d) for n, m, d in zip(names, out.get("masks", []), dtypes, strict=True)}
        return out["image"], result
