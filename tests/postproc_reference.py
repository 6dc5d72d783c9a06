"""Straightforward per-instance implementations of the post-processing (loops over instances and full-size
masks), to check the vectorised versions and to time them against (benchmarks/postproc_speed.py)."""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from cerberus_histo.data.targets import ellipse_kernel
from cerberus_histo.postproc.instances import GlandParams, NucleiParams, _kernel


def _remove_small_loop(labels, min_area):
    for i in np.unique(labels)[1:]:
        m = labels == i
        if m.sum() < min_area:
            labels[m] = 0
    return labels


def nuclei_loop(interior, contour, mpp=0.5, params=None):
    params = params or NucleiParams()
    fg = (interior + contour) > params.fg_threshold
    k = _kernel(params.erosion_um, mpp)
    if k is not None:
        fg = ndi.binary_erosion(fg, k, border_value=1)
    fg = _remove_small_loop(ndi.label(fg)[0], params.min_area_um2 / mpp**2) > 0
    markers = _remove_small_loop(ndi.label(interior > params.marker_threshold)[0], params.min_marker_area_um2 / mpp**2) > 0
    markers = ndi.label(ndi.binary_fill_holes(markers))[0]
    if not markers.any():
        return np.zeros(interior.shape, np.int32)
    inst = watershed(-interior, markers, mask=fg)
    out = np.zeros(inst.shape, np.int32)
    for new, i in enumerate(np.unique(inst)[1:], start=1):
        out[inst == i] = new
    return out


def gland_loop(interior, contour, mpp=0.5, params=None):
    params = params or GlandParams()
    core = (interior - (contour > params.contour_threshold)) > params.core_threshold
    labels = _remove_small_loop(ndi.label(core)[0], params.min_area_um2 / mpp**2)
    k = _kernel(params.dilation_um, mpp)
    pad = 2 * (k.shape[0] if k is not None else 1)
    out = np.zeros(labels.shape, np.int32)
    h, w = labels.shape
    for new, i in enumerate(np.unique(labels)[1:], start=1):
        ys, xs = np.nonzero(labels == i)
        y0, y1, x0, x1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, h), max(xs.min() - pad, 0), min(xs.max() + 1 + pad, w)
        m = labels[y0:y1, x0:x1] == i
        if k is not None:
            m = ndi.binary_dilation(m, k)
        m = ndi.binary_fill_holes(m)
        out[y0:y1, x0:x1][m] = new
    return out


def types_loop(inst, type_map):
    ids, types, probs = [], [], []
    for i in np.unique(inst)[1:]:
        vals, counts = np.unique(type_map[inst == i], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        t = vals[order[0]]
        if t == 0 and len(vals) > 1:
            nz = vals != 0
            t = vals[nz][np.argmax(counts[nz])]
        ids.append(i)
        types.append(t)
        probs.append(counts[vals == t][0] / counts.sum())
    return np.array(ids), np.array(types), np.array(probs)


def records_loop(inst):
    out = []
    for i in np.unique(inst)[1:]:
        m = inst == i
        ys, xs = np.nonzero(m)
        found, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out.append({"id": int(i), "bbox": [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                    "centroid": [xs.mean(), ys.mean()], "area": float(m.sum()),
                    "contour": max(found, key=len).reshape(-1, 2)})
    return out


__all__ = ["ellipse_kernel", "gland_loop", "nuclei_loop", "records_loop", "types_loop"]
