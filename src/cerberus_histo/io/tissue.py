"""Tissue masks: where on a slide there is tissue, at low resolution, and which level-0 boxes contain some.

:func:`tissue_mask` thresholds the colour saturation of a low-resolution thumbnail (Otsu, clipped to sane
bounds), drops pen ink (saturated green-to-blue hues: in H&E, red never falls below green) and very dark pixels
(black ink, label edges), then cleans the result with morphology whose sizes are in microns. A mask is a boolean
(H, W) array with its ``mask_mpp``; :func:`mask_fraction` and :func:`mask_tiles` map level-0 boxes onto it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from ..errors import CerberusError
from .files import write_png
from .readers import Reader, check_mpp, read_raw

SAT_BOUNDS = (15, 50)  # Otsu's saturation threshold (0..255) is clipped to this: glass ~0-10, pale eosin >= 40
INK_HUES = (60.0, 240.0)  # degrees: green, cyan, blue; H&E spans purple (~250) to pink/red (~350)
INK_MIN_SAT = 25  # saturation (0..255) above which a green-to-blue pixel is ink, not glass
DARK_V = 50  # max(R, G, B) below this is black ink / slide edge, not tissue
DARK_GREY = (110, 40)  # ... and so is max(R, G, B) < 110 with saturation < 40 (grey-black marker)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def tissue_from_rgb(rgb: np.ndarray, mpp: float, close_um: float = 24.0, open_um: float = 8.0,
                    min_object_um2: float = 5000.0, max_hole_um2: float = 50000.0) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image at ``mpp`` microns per pixel (see the module docstring).

    ``close_um`` / ``open_um`` are the radii of the closing (joins nearby tissue) and opening (removes specks);
    objects smaller than ``min_object_um2`` are dropped and holes smaller than ``max_hole_um2`` (lumina) filled.
    """
    mpp = check_mpp(mpp)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
    smooth = cv2.medianBlur(np.ascontiguousarray(rgb), 3) if min(rgb.shape[:2]) >= 3 else rgb
    hsv = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    sat, val = hsv[..., 1], hsv[..., 2]
    ink = (sat > INK_MIN_SAT) & (hue >= INK_HUES[0]) & (hue <= INK_HUES[1])
    dark = (val < DARK_V) | ((val < DARK_GREY[0]) & (sat < DARK_GREY[1]))
    usable = ~(ink | dark)
    values = sat[usable]
    threshold = SAT_BOUNDS[0]
    if values.size and values.min() != values.max():
        from skimage.filters import threshold_otsu

        threshold = int(np.clip(threshold_otsu(values), *SAT_BOUNDS))
    mask = usable & (sat > threshold)

    close_r, open_r = round(close_um / mpp), round(open_um / mpp)
    if close_r > 0:
        pad = close_r + 1  # pad so closing does not glue tissue to the image border
        closed = cv2.morphologyEx(np.pad(mask, pad).astype(np.uint8), cv2.MORPH_CLOSE, _disk(close_r))
        mask = closed[pad:-pad, pad:-pad].astype(bool)
    if open_r > 0:
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _disk(open_r)).astype(bool)
    mask = _remove_small(mask, min_object_um2 / mpp**2)
    holes = _remove_small(~mask, max_hole_um2 / mpp**2, keep_border=True)
    return mask | ~holes


def _remove_small(mask: np.ndarray, min_px: float, keep_border: bool = False) -> np.ndarray:
    """``mask`` without 8-connected components smaller than ``min_px`` pixels (with ``keep_border``, components
    touching the image border are kept whatever their size: background around the slide is not a hole)."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    if keep_border:
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        keep[np.unique(border)] = True
    keep[0] = False
    return keep[labels]


def tissue_mask(reader: Reader, mpp: float = 8.0, **kwargs) -> tuple[np.ndarray, float]:
    """``(mask, mask_mpp)``: a boolean tissue mask of the whole slide, computed on its thumbnail at about ``mpp``
    (8 um/px by default; coarser is faster). ``mask_mpp`` is the mask's exact resolution along x (the thumbnail's
    sides are rounded to whole pixels). Keyword arguments go to :func:`tissue_from_rgb`."""
    thumb = reader.thumbnail(mpp)
    mask_mpp = reader.dimensions[0] * reader.mpp / thumb.shape[1]
    return tissue_from_rgb(thumb, mask_mpp, **kwargs), mask_mpp


def load_mask(path: str | Path, reader: Reader) -> tuple[np.ndarray, float]:
    """``(mask, mask_mpp)`` from a user's mask image of ``reader``'s slide: any size, scaled to the slide's extent;
    non-zero pixels (of any colour channel; > half the maximum when values exceed 1) are tissue. Unreadable files
    raise a one-line :class:`CerberusError`; a mask whose aspect ratio differs from the slide's by over 5% warns."""
    path = Path(path)
    raw = read_raw(path)
    if raw.ndim == 3:
        raw = raw[..., :3].max(axis=2) if raw.shape[2] in (3, 4) else raw[..., 0]
    top = raw.max()
    mask = raw > (0 if top <= 1 else top / 2)
    if not mask.any():
        warnings.warn(f"{path.name}: the mask is empty (no tissue); nothing will be processed", stacklevel=2)
    w0, h0 = reader.dimensions
    mh, mw = mask.shape
    if abs((mw / mh) / (w0 / h0) - 1) > 0.05:
        warnings.warn(f"{path.name}: mask is {mw}x{mh} px but the slide is {w0}x{h0}; stretched to fit (is it the "
                      "mask of another slide?)", stacklevel=2)
    mask_mpp = w0 * reader.mpp / mw
    size = (mw, max(1, round(h0 * reader.mpp / mask_mpp)))
    if size != (mw, mh):
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask, mask_mpp


def save_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write ``mask`` as an 8-bit PNG (tissue 255, background 0), atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CerberusError(f"{path}: masks are saved as PNG; name the file .png")
    write_png(path, np.asarray(mask, bool).astype(np.uint8) * 255)


def box_fractions(mask: np.ndarray, mask_mpp: float, boxes: np.ndarray, slide_mpp: float) -> np.ndarray:
    """Tissue fraction of each level-0 box ``(x0, y0, x1, y1)`` (an (N, 4) array): the share of the mask pixels
    the box touches that are tissue, counting parts of the box outside the mask as background."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    s = check_mpp(slide_mpp, "slide_mpp") / check_mpp(mask_mpp, "mask_mpp")
    mh, mw = mask.shape
    integral = np.zeros((mh + 1, mw + 1), np.int64)
    integral[1:, 1:] = np.asarray(mask, bool).cumsum(0).cumsum(1)
    x0, y0 = np.floor(boxes[:, 0] * s).astype(np.int64), np.floor(boxes[:, 1] * s).astype(np.int64)
    x1 = np.maximum(np.ceil(boxes[:, 2] * s).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.ceil(boxes[:, 3] * s).astype(np.int64), y0 + 1)
    area = (x1 - x0) * (y1 - y0)
    cx0, cx1 = np.clip(x0, 0, mw), np.clip(x1, 0, mw)
    cy0, cy1 = np.clip(y0, 0, mh), np.clip(y1, 0, mh)
    inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return inside / area


def mask_fraction(mask: np.ndarray, mask_mpp: float, box_level0: tuple[float, float, float, float],
                  slide_mpp: float) -> float:
    """Tissue fraction in [0, 1] of one level-0 box ``(x0, y0, x1, y1)`` (see :func:`box_fractions`)."""
    return float(box_fractions(mask, mask_mpp, np.asarray([box_level0]), slide_mpp)[0])


def mask_tiles(mask: np.ndarray, mask_mpp: float, boxes: np.ndarray, slide_mpp: float,
               min_fraction: float = 0.0) -> np.ndarray:
    """Boolean per level-0 box ``(x0, y0, x1, y1)``: True where its tissue fraction exceeds ``min_fraction``
    (default: any tissue at all), i.e. the windows an engine should process."""
    return box_fractions(mask, mask_mpp, boxes, slide_mpp) > min_fraction
