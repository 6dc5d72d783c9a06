"""Training targets from annotation maps (pure NumPy + SciPy; no torch).

``instance_target`` builds the original Cerberus 3-class instance target (the ``IP-ERODED-CONTOUR-k``
code): for each instance, ``inner = erode(mask, E)`` and ``outer = dilate(mask, E)`` with ``E`` the k x k
ellipse of OpenCV's ``MORPH_ELLIPSE``; the label is 1 on the union of the inners, 2 on the union of the bands
``outer - inner`` (a band (k - 1) / 2 px inside plus (k - 1) / 2 px outside the true boundary), 0 elsewhere.
As in OpenCV's defaults, erosion treats the outside of the image as object (instances cut by the image edge
are not eroded there) and dilation treats it as background.

``separation_weight`` is the U-Net weight map computed on the connected components of the eroded interiors:
``1 + w0 * exp(-((d1 + d2) / sigma)^2 / 2)`` with ``d1``, ``d2`` the distances to the nearest and second
nearest component (a component's distance counts only within its box grown by ``decay_margin`` px, 1000
beyond), 1 inside the interiors and everywhere when there are fewer than two components.

All work is done per instance inside its bounding box, so the cost grows with the labelled area, not with
the number of instances times the image size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

BACKGROUND, INTERIOR, CONTOUR = 0, 1, 2
_FAR = 1000.0


def ellipse_kernel(ksize: int) -> np.ndarray:
    """The ``ksize x ksize`` boolean ellipse of ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))``.

    k = 3 gives the 4-connected cross; k = 1 a single pixel.
    """
    if ksize < 1:
        raise ValueError(f"kernel size must be >= 1, got {ksize}")
    r = ksize // 2
    kernel = np.zeros((ksize, ksize), bool)
    for i in range(ksize):
        dy = i - r
        # OpenCV: dx = round(c * sqrt((r^2 - dy^2) / r^2)), half-width of the row
        dx = int(np.round(r * np.sqrt((r * r - dy * dy) / (r * r)))) if r > 0 else 0
        kernel[i, max(r - dx, 0):min(r + dx + 1, ksize)] = True
    return kernel


def _grown(sl: tuple[slice, slice], margin: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(sl, shape, strict=True))


def fix_mirror_padding(inst: np.ndarray) -> np.ndarray:
    """Give a new id to every extra 4-connected piece of an instance (copies made by reflect padding in
    shape augmentation). The first piece in raster order keeps its id; new ids start above the maximum.
    Returns a new array."""
    out = np.array(inst, copy=True)
    next_id = int(out.max(initial=0)) + 1
    for idx, sl in enumerate(ndi.find_objects(inst)):
        if sl is None:
            continue
        pieces, n = ndi.label(inst[sl] == idx + 1)
        if n > 1:
            view = out[sl]
            for piece in range(2, n + 1):
                view[pieces == piece] = next_id
                next_id += 1
    return out


def instance_target(inst: np.ndarray, ksize: int, ids=None) -> np.ndarray:
    """The 3-class eroded-contour label (uint8: 0 background, 1 eroded interior, 2 contour band).

    ``ids`` restricts the target to some instances (the original uses those visible in the output crop);
    by default every instance is used.
    """
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise ValueError(f"instance map must be 2-D, got shape {inst.shape}")
    kernel = ellipse_kernel(ksize)
    r = ksize // 2 + 1
    inner_map = np.zeros(inst.shape, bool)
    band_map = np.zeros(inst.shape, bool)
    keep = None if ids is None else set(int(i) for i in ids)
    for idx, sl in enumerate(ndi.find_objects(inst)):
        if sl is None or (keep is not None and idx + 1 not in keep):
            continue
        box = _grown(sl, r, inst.shape)
        mask = inst[box] == idx + 1
        inner = ndi.binary_erosion(mask, kernel, border_value=1)
        outer = ndi.binary_dilation(mask, kernel, border_value=0)
        inner_map[box] |= inner
        band_map[box] |= outer & ~inner
    label = np.zeros(inst.shape, np.uint8)
    label[inner_map] = INTERIOR
    label[band_map] = CONTOUR
    return label


def separation_weight(interior: np.ndarray, sigma: float, w0: float = 10.0, decay_margin: int = 10) -> np.ndarray:
    """U-Net separation weights (float32, >= 1) from a boolean map of eroded interiors (``label == 1``)."""
    comps, n = ndi.label(np.asarray(interior) > 0)
    weight = np.ones(comps.shape, np.float32)
    if n <= 1:
        return weight
    d1 = np.full(comps.shape, _FAR, np.float32)
    d2 = np.full(comps.shape, _FAR, np.float32)
    for idx, sl in enumerate(ndi.find_objects(comps)):
        box = _grown(sl, decay_margin, comps.shape)
        d = ndi.distance_transform_edt(comps[box] != idx + 1).astype(np.float32)
        r1, r2 = d1[box], d2[box]
        d2[box] = np.where(d < r1, r1, np.minimum(r2, d))
        d1[box] = np.minimum(r1, d)
    w = w0 * np.exp(-(((d1 + d2) / sigma) ** 2) / 2)
    w[comps > 0] = 0
    return (weight + w).astype(np.float32)


def type_target(inst: np.ndarray, ids, classes) -> np.ndarray:
    """Per-pixel class map (int32) painting each instance ``ids[i]`` with ``classes[i]``; 0 elsewhere and for
    instances not listed."""
    inst = np.asarray(inst)
    ids = np.asarray(ids, np.int64).ravel()
    classes = np.asarray(classes, np.int64).ravel()
    if ids.shape != classes.shape:
        raise ValueError(f"{ids.size} instance ids but {classes.size} classes")
    lut = np.zeros(int(max(inst.max(initial=0), ids.max(initial=0))) + 1, np.int32)
    lut[ids] = classes
    return lut[inst]
