"""Synthetic whole-slide images: a pyramidal tiled BigTIFF of tissue islands on white, with exact ground truth.

The slide is a grid of *fields* (``field`` px squares, the grid shifted by ``offset`` so that field borders
do not fall on round chunk borders), each either background or one of ``n_fields`` synthetic tiles
(:func:`~cerberus_histo.data.synthetic.synth_tile`) in one of its 8 rotations/flips. Tissue cells form
islands from a smoothed random field. Because every level is composed from the small field library, the
writer streams tiles in row-major order and its memory does not grow with the slide's size.

Files: ``X.tif`` (level 0 at ``mpp``, reduced levels as top-level IFDs with ``subfiletype=1``, resolution
tags in cm, JPEG or deflate tiles; read by OpenSlide, tiffslide and TIAToolbox with the right mpp), and the
ground truth ``X.truth.json`` (layout) + ``X.truth.npz`` (the field library's labels), read by
:class:`SlideTruth`: instance maps with slide-wide unique ids, their classes, and the tissue-class map, for
any region. ``X.tif`` is written last, so a complete slide always has its truth.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from ..errors import CerberusError
from ..io.files import json_text
from .dataset import atomic_write_bytes
from .synthetic import synth_tile

ALIGN = 128  # field and offset are multiples of this, so levels down to 1/128 compose exactly
BACKGROUND_RGB = (243, 241, 244)
ID_STRIDE = 1 << 16  # global id = cell slot * ID_STRIDE + id within the field
TASKS = ("nuclei", "gland", "lumen")


@dataclass(frozen=True)
class SlideLayout:
    width: int
    height: int
    mpp: float
    seed: int
    field: int
    offset: int
    n_fields: int
    cells: list  # rows of library indices (-1 = background)
    variants: list  # rows of dihedral variants 0..7

    @property
    def nrows(self) -> int:
        return len(self.cells)

    @property
    def ncols(self) -> int:
        return len(self.cells[0])


def make_layout(width: int, height: int, mpp: float = 0.5, seed: int = 0, field: int = 1024, offset: int = 384,
                n_fields: int = 8, tissue_fraction: float = 0.45) -> SlideLayout:
    if width < 64 or height < 64:
        raise CerberusError(f"a slide needs at least 64 x 64 px, got {width} x {height}")
    if field % ALIGN or offset % ALIGN or not 0 <= offset < field or field < 256:
        raise CerberusError(f"--field must be a multiple of {ALIGN} >= 256 and the offset a multiple of {ALIGN} below it")
    if not 0.05 <= mpp <= 50:
        raise CerberusError(f"--mpp must be microns per pixel (e.g. 0.5), got {mpp}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    nrows, ncols = math.ceil((height + offset) / field), math.ceil((width + offset) / field)
    noise = ndi.gaussian_filter(rng.standard_normal((nrows + 2, ncols + 2)), 1.0)[1:-1, 1:-1]
    tissue = noise >= np.quantile(noise, 1 - tissue_fraction)
    if nrows >= 4 and ncols >= 4:  # a white margin around the tissue
        tissue[[0, -1], :] = tissue[:, [0, -1]] = False
    if not tissue.any():
        tissue[nrows // 2, ncols // 2] = True
    cells = np.where(tissue, rng.integers(0, n_fields, (nrows, ncols)), -1)
    variants = rng.integers(0, 8, (nrows, ncols))
    return SlideLayout(width, height, float(mpp), int(seed), field, offset, n_fields, cells.tolist(), variants.tolist())


def _dihedral(a: np.ndarray, v: int) -> np.ndarray:
    a = np.rot90(a, v % 4, axes=(0, 1))
    return a[:, ::-1] if v >= 4 else a


def _compose(layout: SlideLayout, library: list[np.ndarray], x: int, y: int, w: int, h: int, scale: int,
             fill, slot_ids: bool = False) -> np.ndarray:
    """Region (x, y, w, h) of a level downsampled ``scale`` times, from a library of fields at that level.
    With ``slot_ids``, non-zero values become slide-wide ids (slot * ID_STRIDE + value)."""
    f, off = layout.field // scale, layout.offset // scale
    sample = library[0]
    out = np.empty((h, w) + sample.shape[2:], np.int64 if slot_ids else sample.dtype)
    out[...] = fill
    cells, variants = layout.cells, layout.variants
    for r in range(max((y + off) // f, 0), min((y + h - 1 + off) // f + 1, layout.nrows)):
        for c in range(max((x + off) // f, 0), min((x + w - 1 + off) // f + 1, layout.ncols)):
            idx = cells[r][c]
            if idx < 0:
                continue
            cy, cx = r * f - off, c * f - off
            y0, y1, x0, x1 = max(y, cy), min(y + h, cy + f), max(x, cx), min(x + w, cx + f)
            part = _dihedral(library[idx], variants[r][c])[y0 - cy:y1 - cy, x0 - cx:x1 - cx]
            if slot_ids:
                slot = r * layout.ncols + c + 1
                part = np.where(part > 0, part.astype(np.int64) + slot * ID_STRIDE, 0)
            out[y0 - y:y1 - y, x0 - x:x1 - x] = part
    return out


def _level_sizes(width: int, height: int, tile: int) -> list[tuple[int, int, int]]:
    """``(scale, width, height)`` per pyramid level, down to one tile (at most 1/ALIGN)."""
    levels, scale = [], 1
    while True:
        levels.append((scale, math.ceil(width / scale), math.ceil(height / scale)))
        if max(levels[-1][1:]) <= tile or scale >= ALIGN:
            return levels
        scale *= 2


def write_synthetic_slide(out: str | Path, width: int, height: int, mpp: float = 0.5, seed: int = 0,
                          field: int = 1024, offset: int = 384, n_fields: int = 8, tile: int = 512,
                          compression: str = "jpeg", progress: bool = True, tissue_fraction: float = 0.45) -> Path:
    """Write ``out`` (a pyramidal BigTIFF) and its ground truth; see the module docstring. ``tissue_fraction``:
    the share of the field grid with tissue (1: all but a one-field white border on slides of 4+ fields a side)."""
    import tifffile

    out = Path(out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise CerberusError(f"{out}: the slide is a TIFF; name it .tif or .tiff")
    if compression not in ("jpeg", "deflate"):
        raise CerberusError(f"compression must be jpeg or deflate, got {compression!r}")
    layout = make_layout(width, height, mpp, seed, field, offset, n_fields, tissue_fraction)
    fields = [synth_tile(field, np.random.default_rng(np.random.SeedSequence([seed, 1000 + i])))
              for i in tqdm(range(n_fields), desc="synth slide fields", unit="field",
                            disable=None if progress else True)]
    _write_truth(out, layout, fields)
    levels = _level_sizes(width, height, tile)
    images = {1: [fd.image for fd in fields]}
    for scale, _, _ in levels[1:]:
        images[scale] = [cv2.resize(im, (field // scale,) * 2, interpolation=cv2.INTER_AREA) for im in images[1]]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    codec = {"compression": "jpeg", "compressionargs": {"level": 90}} if compression == "jpeg" else \
        {"compression": "zlib", "compressionargs": {"level": 6}}
    total = sum(math.ceil(w / tile) * math.ceil(h / tile) for _, w, h in levels)
    bar = tqdm(total=total, desc="synth slide tiles", unit="tile", disable=None if progress else True)

    def tiles(scale, w, h):
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                bar.update()
                yield _compose(layout, images[scale], tx, ty, tile, tile, scale, BACKGROUND_RGB)

    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for scale, w, h in levels:
                res = 1e4 / (mpp * scale)  # pixels per cm
                tif.write(tiles(scale, w, h), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                          photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER",
                          subfiletype=0 if scale == 1 else 1, metadata=None,
                          description=f"Cerberus synthetic slide|mpp={mpp}|seed={seed}" if scale == 1 else None,
                          **codec)
        os.replace(tmp, out)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return out


def _truth_paths(slide: Path) -> tuple[Path, Path]:
    stem = slide.with_suffix("")
    return stem.with_name(stem.name + ".truth.json"), stem.with_name(stem.name + ".truth.npz")


def _write_truth(slide: Path, layout: SlideLayout, fields) -> None:
    meta, arrays = _truth_paths(slide)
    data = {}
    for i, fd in enumerate(fields):
        data[f"tissue_{i}"] = fd.tissue
        for task, inst, classes in (("nuclei", fd.nuclei_inst, fd.nuclei_class), ("gland", fd.gland_inst,
                                    fd.gland_class), ("lumen", fd.lumen_inst, fd.lumen_parent)):
            if inst.max(initial=0) >= ID_STRIDE:
                raise CerberusError(f"a field holds more than {ID_STRIDE - 1} {task} instances; use a smaller --field")
            lut = np.zeros(int(inst.max(initial=0)) + 1, np.int32)
            for k, v in classes.items():
                lut[k] = v  # lumen: the id of its gland within the same field
            data[f"{task}_{i}"] = inst
            data[f"{task}_lut_{i}"] = lut
    buf = io.BytesIO()
    np.savez_compressed(buf, **data)
    atomic_write_bytes(arrays, buf.getvalue())
    doc = {"format": "cerberus synthetic slide truth", "version": 1, "id_stride": ID_STRIDE, "layout": asdict(layout)}
    atomic_write_bytes(meta, json_text(doc).encode())


class SlideTruth:
    """Ground truth of a synthetic slide, at level 0.

    ``read_region(task, x, y, w, h)`` gives ``(inst, classes)``: an int64 instance map with slide-wide ids and
    ``{id: class}`` (for ``lumen``, ``{lumen id: id of its gland}``). ``tissue(x, y, w, h)`` gives the
    tissue-class map (0 = background also off the tissue islands), ``fields(x, y, w, h)`` where the islands' fields
    lie.
    """

    def __init__(self, slide: str | Path):
        meta, arrays = _truth_paths(Path(slide))
        if not meta.is_file() or not arrays.is_file():
            raise CerberusError(f"{meta} / {arrays}: ground truth of {slide} not found")
        doc = json.loads(meta.read_text())
        self.layout = SlideLayout(**doc["layout"])
        with np.load(arrays, allow_pickle=False) as z:
            n = self.layout.n_fields
            self._inst = {t: [z[f"{t}_{i}"] for i in range(n)] for t in TASKS}
            self._lut = {t: [z[f"{t}_lut_{i}"] for i in range(n)] for t in TASKS}
            self._tissue = [z[f"tissue_{i}"] for i in range(n)]

    @property
    def mpp(self) -> float:
        return self.layout.mpp

    def read_region(self, task: str, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, dict[int, int]]:
        if task not in TASKS:
            raise CerberusError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        inst = _compose(self.layout, self._inst[task], x, y, w, h, 1, 0, slot_ids=True)
        classes = {}
        for gid in np.unique(inst[inst > 0]).tolist():
            slot, local = divmod(gid, ID_STRIDE)
            r, c = divmod(slot - 1, self.layout.ncols)
            value = int(self._lut[task][self.layout.cells[r][c]][local])
            classes[gid] = value + slot * ID_STRIDE if task == "lumen" else value
        return inst, classes

    def tissue(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return _compose(self.layout, self._tissue, x, y, w, h, 1, 0)

    def fields(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Where a tissue field lies (bool): the area whose tissue classes are known, white gut lumen included."""
        ones = [np.ones(t.shape, bool) for t in self._tissue]
        return _compose(self.layout, ones, x, y, w, h, 1, False)
