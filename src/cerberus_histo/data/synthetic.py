"""Synthetic H&E histology with exact labels, for tests, demos and training without downloads.

Tiles are painted as haematoxylin and eosin *concentrations* and turned into RGB with a randomly perturbed
stain matrix (Beer-Lambert), then blurred, shaded and noised, so a model cannot rely on one colour. At
0.5 um/px a tile holds tissue regions of the nine tissue classes; the epithelial regions hold glands (class
``gland``: a ring of epithelium around one lumen, or several in abnormal epithelium; class ``surface-epi``: a
band of columnar epithelium along the tissue surface); every nucleus is one of the six types, each with its
own size, shape, colour and texture:

=========== ================================================================
neutrophil  3-4 small dark lobes in a pale cytoplasm
epithelial  large oval, vesicular (pale with speckles and a nucleolus), in glands
lymphocyte  small, round, dark, uniform
plasma      round nucleus set eccentrically in a purple cytoplasm, clock-face chromatin
eosinophil  two lobes in a bright red granular cytoplasm
connective  thin elongated spindle
=========== ================================================================

Labels are exact because they are the masks that were painted: gland, lumen and nucleus instance maps with
classes, and the tissue-class map. Everything is deterministic given the seed. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from ..errors import CerberusError
from ..tasks import TISSUE
from .dataset import (
    Annotation,
    AnnotationSpec,
    DatasetSpec,
    atomic_write_bytes,
    write_label,
    write_rgb,
    write_splits,
)

BACKGROUND, ABNORMAL_EPI, NORMAL_EPI, INFLAMMATORY, MUSCLE, STROMA, DEBRIS, MUCOUS, ADIPOSE = range(9)
NEUTROPHIL, EPITHELIAL, LYMPHOCYTE, PLASMA, EOSINOPHIL, CONNECTIVE = range(1, 7)
GLAND, SURFACE_EPI = 1, 2
MPP = 0.5

# stain optical-density vectors (RGB), Ruifrok & Johnston
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])

# per tissue class: (eosin, haematoxylin) base, texture strength, nuclei per 10^4 px by type
_REGION = {
    BACKGROUND: ((0.02, 0.01), 0.01, {}),
    ABNORMAL_EPI: ((0.28, 0.05), 0.06, {LYMPHOCYTE: 1.0, CONNECTIVE: 1.0, PLASMA: 0.4}),
    NORMAL_EPI: ((0.30, 0.05), 0.06, {LYMPHOCYTE: 2.0, PLASMA: 1.5, CONNECTIVE: 0.8, EOSINOPHIL: 0.4}),
    INFLAMMATORY: ((0.25, 0.06), 0.06, {LYMPHOCYTE: 14.0, PLASMA: 5.0, NEUTROPHIL: 3.0, EOSINOPHIL: 2.0}),
    MUSCLE: ((0.62, 0.04), 0.05, {CONNECTIVE: 3.5}),
    STROMA: ((0.40, 0.03), 0.12, {CONNECTIVE: 3.0, LYMPHOCYTE: 0.6}),
    DEBRIS: ((0.30, 0.10), 0.15, {NEUTROPHIL: 5.0}),
    MUCOUS: ((0.06, 0.16), 0.08, {}),
    ADIPOSE: ((0.0, 0.0), 0.0, {CONNECTIVE: 0.2}),
}
_REGION_WEIGHTS = np.array([0.5, 1.2, 1.2, 1.0, 0.8, 1.2, 0.5, 0.5, 0.6])


@dataclass
class SyntheticTile:
    """One synthetic tile and its exact labels (all arrays ``size x size``)."""

    image: np.ndarray  # uint8 RGB
    tissue: np.ndarray  # uint8 tissue-class map (TISSUE.class_names)
    gland_inst: np.ndarray  # int32 instance ids
    gland_class: dict[int, int]  # id -> 1 gland, 2 surface-epi
    lumen_inst: np.ndarray  # int32; every lumen lies inside one gland
    lumen_parent: dict[int, int]  # lumen id -> gland id
    nuclei_inst: np.ndarray  # int32
    nuclei_class: dict[int, int]  # id -> NUCLEI class (1..6)


def _smooth_noise(rng, shape, sigma, amplitude=1.0, aniso=None) -> np.ndarray:
    """Gaussian-smoothed noise with unit std times ``amplitude``; wide kernels are applied at a lower
    resolution and upsampled (the same look, a fraction of the time)."""
    f = int(sigma // 4) if aniso is None and sigma > 8 else 1
    small = (-(-shape[0] // f), -(-shape[1] // f))
    n = rng.standard_normal(small).astype(np.float32)
    n = ndi.gaussian_filter(n, sigma / f if aniso is None else aniso)
    if f > 1:
        n = cv2.resize(n, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return amplitude * n / (n.std() + 1e-6)


def _box(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """Bounding box of ``mask`` grown by ``pad`` px (within the array)."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    h, w = mask.shape
    return slice(max(ys[0] - pad, 0), min(ys[-1] + pad + 1, h)), slice(max(xs[0] - pad, 0), min(xs[-1] + pad + 1, w))


def _star(rng, radius: float, irregular: float, n: int = 64, aspect=(0.7, 1.0)) -> np.ndarray:
    """Vertices (x, y) of a random star-convex blob around (0, 0)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += irregular * rng.uniform(0, 1.0 / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    a = rng.uniform(*aspect)
    rot = rng.uniform(0, np.pi)
    x, y = radius * r * np.cos(t), radius * a * r * np.sin(t)
    return np.stack([x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)], 1)


def _fill(shape, poly, offset) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round((poly + offset) * 4).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=2)
    return mask.astype(bool)


class _Canvas:
    """H and E concentration maps plus the label maps, painted in place."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.h = np.zeros((size, size), np.float32)
        self.e = np.zeros((size, size), np.float32)
        self.tissue = np.zeros((size, size), np.uint8)
        self.gland = np.zeros((size, size), np.int32)
        self.lumen = np.zeros((size, size), np.int32)
        self.nuclei = np.zeros((size, size), np.int32)
        self.gland_class: dict[int, int] = {}
        self.lumen_parent: dict[int, int] = {}
        self.nuclei_class: dict[int, int] = {}
        self.blocked = np.zeros((size, size), bool)  # lumina: no nuclei there

    # ---- regions -----------------------------------------------------------------------------------
    def regions(self, classes: list[int]) -> None:
        s, rng = self.size, self.rng
        if len(classes) == 1:
            self.tissue[:] = classes[0]
        else:
            seeds = rng.uniform(0, s, (len(classes), 2))
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
            warp_y, warp_x = _smooth_noise(rng, (s, s), s / 8, s / 10), _smooth_noise(rng, (s, s), s / 8, s / 10)
            d = np.stack([(yy + warp_y - sy) ** 2 + (xx + warp_x - sx) ** 2 for sy, sx in seeds])
            self.tissue[:] = np.asarray(classes, np.uint8)[d.argmin(0)]
        for cls in np.unique(self.tissue):
            self._paint_region(int(cls), self.tissue == cls)

    def _paint_region(self, cls: int, where: np.ndarray) -> None:
        rng, s = self.rng, self.size
        (e0, h0), tex, _ = _REGION[cls]
        if cls == STROMA:  # wavy collagen fibres
            t = _smooth_noise(rng, (s, s), None, tex, aniso=(1.0, 6.0))
            t = ndi.rotate(t, rng.uniform(0, 180), reshape=False, mode="reflect")
        elif cls == MUSCLE:  # parallel smooth fibres with faint cross-banding
            t = _smooth_noise(rng, (s, s), None, tex, aniso=(2.0, 25.0))
            t = ndi.rotate(t, rng.uniform(0, 180), reshape=False, mode="reflect")
        elif cls == ADIPOSE:  # empty vacuoles with thin eosin membranes
            seeds = np.zeros((s, s), bool)
            seeds[tuple(rng.integers(0, s, (2, max(4, (s // 45) ** 2))))] = True
            _, (iy, ix) = ndi.distance_transform_edt(~seeds, return_indices=True)
            cell = iy * s + ix  # id of the nearest seed: Voronoi cells
            edges = (ndi.maximum_filter(cell, 3) != ndi.minimum_filter(cell, 3)).astype(np.float32)
            membrane = np.clip(ndi.gaussian_filter(edges, 0.8) * 2.5, 0, 1)
            self.e[where] = (0.05 + 0.45 * membrane)[where]
            self.h[where] = 0.01
            return
        elif cls == MUCOUS:  # wispy pale blue strands
            t = np.abs(_smooth_noise(rng, (s, s), 3.0, tex))
        elif cls == DEBRIS:  # patchy eosin and scattered haematoxylin specks
            t = _smooth_noise(rng, (s, s), 4.0, tex)
            specks = rng.random((s, s)) < 0.004
            self.h[where & ndi.binary_dilation(specks, iterations=1)] += 0.5
        else:
            t = _smooth_noise(rng, (s, s), 2.0, tex)
        self.e[where] = np.clip(e0 + t, 0, None)[where]
        self.h[where] = np.clip(h0 + (0.5 * t if cls == MUCOUS else 0.1 * t), 0, None)[where]

    # ---- glands -------------------------------------------------------------------------------------
    def glands(self, region: np.ndarray, abnormal: bool) -> None:
        rng, s = self.rng, self.size
        free = region & (self.gland == 0)
        if free.mean() < 0.02:
            return
        if not abnormal and rng.random() < 0.35:
            self._surface_epithelium(region)
            region = region & ~self.blocked & (self.gland == 0)
            free = region
        for _ in range(max(1, round(120 * (s / 448) ** 2))):  # the same density of attempts at any size
            cy, cx = rng.uniform(-0.1 * s, 1.1 * s, 2)
            iy, ix = int(np.clip(cy, 0, s - 1)), int(np.clip(cx, 0, s - 1))
            if not free[iy, ix]:
                continue
            radius = rng.uniform(40, 75) if abnormal else rng.uniform(26, 42)
            outer = _fill((s, s), _star(rng, radius, 1.2 if abnormal else 0.4), (cx, cy))
            if outer.sum() < 400:
                continue
            box = _box(outer, 16)
            grown = ndi.binary_dilation(outer[box], iterations=4)
            if (grown & (self.gland[box] > 0)).any() or (outer[box] & ~region[box]).sum() > 0.15 * outer.sum():
                continue
            self._gland(outer, box, abnormal, (cx, cy), radius)
            free = region & (self.gland == 0)

    def _gland(self, outer: np.ndarray, box, abnormal: bool, centre, radius) -> None:
        """A gland ``outer`` (full-size mask, its work done inside ``box``) with its lumina and nuclei."""
        rng = self.rng
        gid = len(self.gland_class) + 1
        lumina = []
        inner_ok = ndi.binary_erosion(outer[box], iterations=10)
        n_lumina = rng.integers(2, 5) if abnormal and rng.random() < 0.6 else 1
        for _ in range(30):
            if len(lumina) == n_lumina:
                break
            if n_lumina == 1:
                off = np.zeros(2)
                r = radius * rng.uniform(0.35, 0.5)
            else:
                off = rng.uniform(-0.45, 0.45, 2) * radius
                r = radius * rng.uniform(0.15, 0.25)
            lum = _fill(outer.shape, _star(rng, r, 0.5), np.asarray(centre) + off)
            if lum.sum() < 30 or (lum.sum() != lum[box].sum()) or (lum[box] & ~inner_ok).any() or any(
                    (lum[box] & ndi.binary_dilation(o[box], iterations=6)).any() for o in lumina):
                continue
            lumina.append(lum)
        if not lumina:
            return
        self.gland[outer] = gid
        self.gland_class[gid] = GLAND
        epi = outer.copy()
        for lum in lumina:
            lid = len(self.lumen_parent) + 1
            self.lumen[lum] = lid
            self.lumen_parent[lid] = gid
            epi &= ~lum
            self.blocked |= lum
        # epithelial cytoplasm: pink-purple; lumen: pale, with secretions/necrosis in abnormal glands
        self.e[epi] = 0.22 + 0.04 * rng.standard_normal(int(epi.sum()))
        self.h[epi] = 0.16
        all_lum = np.any(lumina, axis=0)
        self.e[all_lum] = 0.04 + (0.10 * rng.random(int(all_lum.sum())) if abnormal else 0.0)
        self.h[all_lum] = 0.02 + (0.08 * (rng.random(int(all_lum.sum())) < 0.05) if abnormal else 0.0)
        self._epithelial_nuclei(epi, outer, crowded=abnormal)

    def _surface_epithelium(self, region: np.ndarray) -> None:
        rng, s = self.rng, self.size
        side = rng.integers(4)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        along, across = [(xx, yy), (yy, xx), (xx, s - 1 - yy), (yy, s - 1 - xx)][side]
        edge = 20 + 12 * np.sin(along / rng.uniform(30, 60) + rng.uniform(0, 6))
        width = rng.uniform(28, 40)
        band = (across >= edge) & (across < edge + width) & region
        if band.sum() < 800:
            return
        band = ndi.binary_opening(band, iterations=2)
        labels, n = ndi.label(band)
        if n == 0:
            return
        band = labels == (1 + np.argmax(ndi.sum(band, labels, range(1, n + 1))))
        gid = len(self.gland_class) + 1
        self.gland[band] = gid
        self.gland_class[gid] = SURFACE_EPI
        outside = across < edge  # the gut lumen: no tissue
        self.tissue[outside & region] = BACKGROUND
        self.e[outside & region], self.h[outside & region] = 0.02, 0.01
        self.blocked |= outside & region
        self.e[band] = 0.36
        self.h[band] = 0.07
        self._epithelial_nuclei(band, band, crowded=False)

    def _epithelial_nuclei(self, epi: np.ndarray, outer: np.ndarray, crowded: bool) -> None:
        """Oval nuclei in the epithelium, their long axis across the layer (towards the basement)."""
        rng = self.rng
        box = _box(outer, 4)
        dist = ndi.distance_transform_edt(outer[box])
        gy, gx = np.gradient(ndi.gaussian_filter(dist, 2))
        # normal glands: one basal row of nuclei; abnormal: crowded, stratified, larger
        ys, xs = np.nonzero(epi[box] & (dist > 6) & (True if crowded else dist <= 16))
        if len(ys) == 0:
            return
        n = max(3, int(len(ys) / (90 if crowded else 60)))
        for i in rng.permutation(len(ys))[: n * 6]:
            if n <= 0:
                break
            y, x = ys[i], xs[i]
            angle = np.degrees(np.arctan2(gy[y, x], gx[y, x]))
            scale = rng.uniform(1.1, 1.4) if crowded else rng.uniform(0.9, 1.1)
            # in a thin layer, a smaller or tangential nucleus fits where a radial one does not
            for a, sc in ((angle, scale), (angle, 0.7 * scale), (angle + 90, 0.7 * scale)):
                if self._nucleus(EPITHELIAL, y + box[0].start, x + box[1].start, a, sc, within=epi):
                    n -= 1
                    break

    # ---- nuclei ---------------------------------------------------------------------------------------
    def scatter_nuclei(self) -> None:
        """Stromal and inflammatory cells of each region, outside glands."""
        rng, s = self.rng, self.size
        for cls in np.unique(self.tissue):
            where = (self.tissue == cls) & (self.gland == 0) & ~self.blocked
            area = where.sum()
            for ntype, density in _REGION[int(cls)][2].items():
                for _ in range(rng.poisson(density * area / 1e4)):
                    for _try in range(5):
                        y, x = rng.integers(0, s, 2)
                        if where[y, x] and self._nucleus(ntype, y, x, rng.uniform(0, 180), 1.0, within=where):
                            break

    def _nucleus(self, ntype: int, y: int, x: int, angle: float, scale: float, within: np.ndarray) -> bool:
        """Paint one nucleus of ``ntype`` centred at (y, x) if it fits without overlap; True when painted."""
        rng, s = self.rng, self.size
        b = 16
        y0, y1, x0, x1 = max(y - b, 0), min(y + b + 1, s), max(x - b, 0), min(x + b + 1, s)
        cy, cx = y - y0, x - x0
        shape = (y1 - y0, x1 - x0)
        mask = np.zeros(shape, np.uint8)
        cyto = np.zeros(shape, np.uint8)
        def ell(m, c, axes, ang):
            cv2.ellipse(m, (int(round(c[1])), int(round(c[0]))), tuple(int(max(1, round(a))) for a in axes),
                        ang, 0, 360, 1, -1)
        if ntype == LYMPHOCYTE:
            r = rng.uniform(4.5, 6.0)
            ell(mask, (cy, cx), (r, r * rng.uniform(0.85, 1.0)), angle)
        elif ntype == EPITHELIAL:
            ell(mask, (cy, cx), (rng.uniform(8, 11) * scale, rng.uniform(5, 6.5) * scale), angle)
        elif ntype == CONNECTIVE:
            ell(mask, (cy, cx), (rng.uniform(11, 15), rng.uniform(2.0, 3.0)), angle)
        elif ntype == PLASMA:
            ell(cyto, (cy, cx), (rng.uniform(9, 11), rng.uniform(7, 8)), angle)
            t = np.radians(angle)
            off = rng.uniform(3, 4)
            ell(mask, (cy + off * np.sin(t), cx + off * np.cos(t)), (5, 5), 0)
        elif ntype in (NEUTROPHIL, EOSINOPHIL):
            ell(cyto, (cy, cx), (10, 10) if ntype == EOSINOPHIL else (8, 8), 0)
            lobes = 2 if ntype == EOSINOPHIL else rng.integers(3, 5)
            for k in range(lobes):
                t = 2 * np.pi * k / lobes + rng.uniform(-0.3, 0.3) + np.radians(angle)
                ell(mask, (cy + 3.2 * np.sin(t), cx + 3.2 * np.cos(t)), (2.8, 2.2), np.degrees(t))
            mask = ndi.binary_closing(mask, iterations=1).astype(np.uint8)  # one connected nucleus
        m = mask.astype(bool)
        if not m.any():
            return False
        region = (slice(y0, y1), slice(x0, x1))
        clear = ndi.binary_dilation(m, iterations=1)
        if (self.nuclei[region][clear] > 0).any() or (~within[region][m]).any():
            return False
        nid = len(self.nuclei_class) + 1
        self.nuclei[region][m] = nid
        self.nuclei_class[nid] = ntype
        h, e = self.h[region], self.e[region]
        c = cyto.astype(bool) & ~m
        if ntype == PLASMA:
            h[c], e[c] = 0.22, 0.30
        elif ntype == EOSINOPHIL:
            gran = rng.random(int(c.sum())) < 0.6
            e[c] = np.where(gran, 0.95, 0.7)
            h[c] = 0.02
        elif ntype == NEUTROPHIL:
            h[c], e[c] = 0.05, 0.20
        k = int(m.sum())
        if ntype == EPITHELIAL:  # vesicular: pale with speckles and a nucleolus
            h[m] = 0.75 + 0.45 * (rng.random(k) < 0.15)
            e[m] = 0.15
            h[cy, cx] = 1.8
        elif ntype == PLASMA:  # clock-face chromatin
            h[m] = 0.95 + 0.6 * (rng.random(k) < 0.3)
            e[m] = 0.15
        elif ntype == LYMPHOCYTE:
            h[m] = 1.7 + 0.1 * rng.standard_normal(k)
            e[m] = 0.2
        else:
            h[m] = 1.35 + 0.1 * rng.standard_normal(k)
            e[m] = 0.18
        return True

    # ---- rendering ------------------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        rng, s = self.rng, self.size
        stains = np.stack([_H + rng.normal(0, 0.05, 3), _E + rng.normal(0, 0.05, 3)])
        stains = np.clip(stains, 0.02, None)
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
        conc = np.stack([self.h * rng.uniform(0.8, 1.25), self.e * rng.uniform(0.75, 1.3)], -1)
        od = conc @ stains * 1.4
        rgb = 255.0 * np.exp(-od)
        rgb = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), rng.uniform(0.4, 1.2))
        yy, xx = np.mgrid[0:s, 0:s] / s
        light = 1 + rng.uniform(-0.06, 0.06) * (yy - 0.5) + rng.uniform(-0.06, 0.06) * (xx - 0.5)
        rgb = rgb * light[..., None] * rng.uniform(0.93, 1.0, 3)
        rgb += rng.normal(0, rng.uniform(1.0, 4.0), rgb.shape)
        return np.clip(rgb, 0, 255).astype(np.uint8)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def synth_tile(size: int = 448, seed=0, classes: list[int] | None = None) -> SyntheticTile:
    """A ``size x size`` tile at 0.5 um/px with 1-3 tissue regions (``classes`` to choose them) and exact labels."""
    rng = _rng(seed)
    if classes is None:
        n = rng.integers(1, 4)
        p = _REGION_WEIGHTS / _REGION_WEIGHTS.sum()
        classes = list(rng.choice(9, size=n, replace=False, p=p))
        if not {ABNORMAL_EPI, NORMAL_EPI} & set(classes) and rng.random() < 0.6:
            classes[0] = int(rng.choice([ABNORMAL_EPI, NORMAL_EPI]))
    canvas = _Canvas(size, rng)
    canvas.regions([int(c) for c in classes])
    for cls, abnormal in ((NORMAL_EPI, False), (ABNORMAL_EPI, True)):
        region = canvas.tissue == cls
        if region.any():
            canvas.glands(region, abnormal)
    canvas.scatter_nuclei()
    image = canvas.render()
    return SyntheticTile(image, canvas.tissue, canvas.gland, canvas.gland_class, canvas.lumen,
                         canvas.lumen_parent, canvas.nuclei, canvas.nuclei_class)


def synth_patch(tissue_class: int, size: int = 144, seed=0) -> np.ndarray:
    """An RGB patch of one tissue class (``TISSUE.class_names[tissue_class]``) for patch classification: the centre
    of a tile of that class twice as wide, as real patch sets are cut from larger regions (a tile only as large as
    the patch would hold fragments of glands wider than it, packed tighter than in any tile)."""
    if not 0 <= tissue_class < len(TISSUE.class_names):
        raise ValueError(f"tissue class must be in 0..{len(TISSUE.class_names) - 1}")
    q = size // 2
    return np.ascontiguousarray(synth_tile(2 * size, seed, classes=[tissue_class]).image[q:q + size, q:q + size])


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    """Independent stream per sample: sample i is the same whatever n or the order of generation."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


TILE_TASKS = ("gland", "lumen", "nuclei", "tissue")


def write_tiles(out: str | Path, n: int, size: int = 448, seed: int = 0, num_splits: int = 3,
                progress: bool = True, tasks: tuple[str, ...] = TILE_TASKS, name: str = "synthetic-tiles") -> DatasetSpec:
    """Write ``n`` tiles in the common dataset layout (images, labels of ``tasks`` among gland/lumen/nuclei/
    tissue, splits, dataset.yaml). A subset of ``tasks`` makes a partly-labelled dataset, as real sources are.
    ``dataset.yaml`` is written last, so an interrupted run leaves no complete-looking dataset; a re-run
    rewrites identical files."""
    out = Path(out)
    _check_counts(n, size)
    unknown = sorted(set(tasks) - set(TILE_TASKS))
    if not tasks or unknown:
        raise CerberusError(f"synthetic tiles label some of {', '.join(TILE_TASKS)}; got {', '.join(tasks) or 'none'}")
    kinds = {"gland": ("inst", "type"), "lumen": ("inst",), "nuclei": ("inst", "type"), "tissue": ("class_map",)}
    spec = DatasetSpec(
        name=name, root=out, mpp=MPP, num_splits=num_splits,
        description=f"cerberus synth tiles --n {n} --size {size} --seed {seed} --tasks {','.join(tasks)}",
        annotations=tuple(AnnotationSpec(t, kinds[t], dir=f"labels/{t}") for t in TILE_TASKS if t in tasks),
    )
    splits = {}
    for i in tqdm(range(n), desc="synth tiles", unit="tile", disable=None if progress else True):
        name = f"synth_{i:05d}"
        tile = synth_tile(size, _sample_rng(seed, i))
        write_rgb(spec.image_path(name), tile.image)
        for task, inst, classes in (("gland", tile.gland_inst, tile.gland_class),
                                    ("lumen", tile.lumen_inst, tile.lumen_parent),
                                    ("nuclei", tile.nuclei_inst, tile.nuclei_class)):
            if task not in tasks:
                continue
            ids = np.asarray(sorted(classes), np.int32)
            cls = None if task == "lumen" else np.asarray([classes[k] for k in ids], np.int32)
            write_label(spec.label_path(name, task), Annotation(inst_map=inst, ids=ids, classes=cls))
        if "tissue" in tasks:
            write_label(spec.label_path(name, "tissue"), Annotation(class_map=tile.tissue))
        splits[name] = i % num_splits + 1
    write_splits(out / spec.split_csv, splits)
    spec.save()
    return spec


def write_patches(out: str | Path, n_per_class: int, size: int = 144, seed: int = 0, num_splits: int = 3,
                  progress: bool = True) -> DatasetSpec:
    """Write ``n_per_class`` patches of each of the nine tissue classes with ``classes.csv``, splits and
    dataset.yaml (written last)."""
    out = Path(out)
    _check_counts(n_per_class, size)
    spec = DatasetSpec(
        name="synthetic-patches", root=out, mpp=MPP, num_splits=num_splits,
        description=f"cerberus synth patches --n-per-class {n_per_class} --size {size} --seed {seed}",
        annotations=(AnnotationSpec("tissue", ("class",), csv="classes.csv"),),
    )
    rows, splits = ["Filename,Class"], {}
    jobs = [(c, k) for c in range(len(TISSUE.class_names)) for k in range(n_per_class)]
    for j, (cls, k) in enumerate(tqdm(jobs, desc="synth patches", unit="patch", disable=None if progress else True)):
        name = f"{TISSUE.class_names[cls]}_{k:05d}"
        write_rgb(spec.image_path(name), synth_patch(cls, size, _sample_rng(seed, j)))
        rows.append(f"{name},{TISSUE.class_names[cls]}")
        splits[name] = k % num_splits + 1
    atomic_write_bytes(out / "classes.csv", ("\n".join(rows) + "\n").encode())
    write_splits(out / spec.split_csv, splits)
    spec.save()
    return spec


def _check_counts(n: int, size: int) -> None:
    if n < 1:
        raise CerberusError(f"the number of samples must be >= 1, got {n}")
    if size < 64:
        raise CerberusError(f"--size must be at least 64 px (glands are up to ~150 px across), got {size}")
