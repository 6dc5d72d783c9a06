"""Sliding-window geometry: which input windows to read and which part of each output to keep (no torch).

A network window reads ``input`` pixels per side and keeps its central ``output`` pixels; the ``margin``
``(input - output) / 2`` on every side is context only. Output crops are laid on the grid ``k * output`` from the
region's origin and cover the region exactly once (the last crop is clipped to the region), so every output pixel
is computed by one window and no window is computed twice. Windows may reach past the region and the image: the
reader pads with white there (the one padding rule, the same for tiles and slides).

With ``fit`` (the default for our geometry) the output side is shrunk, per axis, to the smallest multiple of
``align`` that still needs the same number of windows: a 1500-px tile with output 720 is cut into three 512-px
crops, and a 100-px tile into one 112-px crop with a 416-px window instead of a 1024-px one; a region no longer
than the input side may run in one larger window when the memory allows (:func:`plan_tiles`). The margin, which
is what decides the result away from the region's borders, never changes.

Phase: with output sides that are multiples of ``align`` (the encoder's overall stride, 16) every window starts
at ``-margin`` modulo 16, so the network sees each image pixel at the same position within its stride grid in
every window, whatever the output side. Our default keeps the original's margin of 152 px (448/144), so on an
image it reproduces the original's windows' phase and context: on a network whose receptive field fits in the
margin both give the same probabilities, and a one-window pass equals the sliding window (see
``docs/inference.md``).

Coarse maps (the dense tissue class, one value per ``cell`` = the encoder's overall stride) are stitched with
:func:`cell_weights`: each window's cells are spread onto the region's cell grid (cell ``m`` covers region pixels
``[m * cell, (m + 1) * cell)``) in proportion to how much of them lies inside the window's output crop. The weights
of one region cell sum to 1 over all windows, so stitching is a weighted sum with no normalisation step. When the
margin is a multiple of ``cell`` every weight is 0 or 1; with a margin of 152 px (9.5 cells, the original's and
our default) each region cell is the mean of the two network cells it straddles, half a cell either side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALIGN = 16  # the overall stride of the original Cerberus encoders


@dataclass(frozen=True)
class Geometry:
    """Input and output window sides in model-resolution pixels.

    ``input_shape - output_shape`` must be even and non-negative; ``align`` (the encoder's overall stride) is the
    unit of :attr:`fit`'s shrinking and the input side must be a multiple of it. Output sides that are multiples
    of ``align`` keep every window on the same stride grid, so the network sees each pixel at the same phase in
    every window (the sliding-window result then equals a one-window result wherever the margin covers the
    network's receptive field).
    """

    input_shape: int
    output_shape: int
    fit: bool = True
    align: int = ALIGN

    def __post_init__(self):
        for key in ("input_shape", "output_shape", "align"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.output_shape > self.input_shape or (self.input_shape - self.output_shape) % 2:
            raise ValueError(f"output_shape ({self.output_shape}) must be <= input_shape ({self.input_shape}) and "
                             "differ from it by an even number of pixels")
        if self.input_shape % self.align:
            raise ValueError(f"input_shape ({self.input_shape}) must be a multiple of the encoder stride "
                             f"({self.align}); e.g. {math.ceil(self.input_shape / self.align) * self.align}")

    @property
    def margin(self) -> int:
        """Context pixels on each side of the output crop."""
        return (self.input_shape - self.output_shape) // 2

    @classmethod
    def original(cls, align: int = ALIGN) -> Geometry:
        """The original Cerberus geometry: 448-px windows keeping their central 144 px, never shrunk."""
        return cls(448, 144, fit=False, align=align)

    @classmethod
    def default(cls, align: int = ALIGN) -> Geometry:
        """Our default: 1024-px windows keeping their central 720 px (the original's margin, 152 px), shrunk to
        fit small regions."""
        return cls(1024, 720, fit=True, align=align)


@dataclass(frozen=True)
class AxisPlan:
    """The windows along one axis of a region of ``length`` pixels: crop ``k`` is ``[k * output, (k + 1) *
    output)`` clipped to the region, its window ``[k * output - margin, k * output - margin + input)``."""

    length: int
    output: int
    margin: int
    count: int

    @property
    def input(self) -> int:
        return self.output + 2 * self.margin

    def window(self, k: int) -> tuple[int, int]:
        start = k * self.output - self.margin
        return start, start + self.input

    def crop(self, k: int) -> tuple[int, int]:
        """Region pixels kept from window ``k`` (clipped to the region)."""
        return k * self.output, min((k + 1) * self.output, self.length)

    @property
    def span(self) -> tuple[int, int]:
        """Region pixels read by all windows together: ``[-margin, count * output + margin)``."""
        return -self.margin, self.count * self.output + self.margin


def plan_axis(length: int, geometry: Geometry, fit: bool | None = None) -> AxisPlan:
    """Windows covering ``length`` (>= 1) pixels; see :class:`Geometry` for ``fit`` (default: the geometry's)."""
    if length < 1:
        raise ValueError(f"a region needs at least 1 pixel per side, got {length}")
    out = geometry.output_shape
    count = math.ceil(length / out)
    if geometry.fit if fit is None else fit:
        a = geometry.align
        out = min(out, math.ceil(math.ceil(length / count) / a) * a)
    return AxisPlan(int(length), int(out), geometry.margin, count)


@dataclass(frozen=True)
class Tile:
    """One window of a :class:`TilePlan`, in region pixels (x then y): ``window`` = (x0, y0, x1, y1) of the input
    read, ``crop`` = (x0, y0, x1, y1) of the output kept. ``crop_in_window`` gives the kept part relative to the
    window's own output (the network's output has the window's size)."""

    row: int
    col: int
    window: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]

    @property
    def crop_in_window(self) -> tuple[int, int, int, int]:
        x0, y0 = self.window[:2]
        return self.crop[0] - x0, self.crop[1] - y0, self.crop[2] - x0, self.crop[3] - y0


@dataclass(frozen=True)
class TilePlan:
    """All windows of a ``width x height`` region, row-major; ``ys`` and ``xs`` plan each axis."""

    width: int
    height: int
    geometry: Geometry
    ys: AxisPlan
    xs: AxisPlan

    @property
    def window_shape(self) -> tuple[int, int]:
        """(h, w) of every window of this plan."""
        return self.ys.input, self.xs.input

    @property
    def read_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in region pixels of the union of all windows: one read serves them all."""
        (x0, x1), (y0, y1) = self.xs.span, self.ys.span
        return x0, y0, x1, y1

    def __len__(self) -> int:
        return self.ys.count * self.xs.count

    def tiles(self) -> list[Tile]:
        out = []
        for r in range(self.ys.count):
            (wy0, wy1), (cy0, cy1) = self.ys.window(r), self.ys.crop(r)
            for c in range(self.xs.count):
                (wx0, wx1), (cx0, cx1) = self.xs.window(c), self.xs.crop(c)
                out.append(Tile(r, c, (wx0, wy0, wx1, wy1), (cx0, cy0, cx1, cy1)))
        return out


def plan_tiles(width: int, height: int, geometry: Geometry, fit: tuple[bool, bool] | None = None,
               max_pixels: int = 0) -> TilePlan:
    """The windows covering a ``width x height`` region (each side >= 1 pixel, any size); ``fit`` = (x, y)
    overrides the geometry's ``fit`` per axis (whole slides fit the windows along an axis that one chunk covers:
    a 12000 x 16 strip gets windows of 1024 x 320 px, not 1024 x 1024).

    ``max_pixels``: where both axes fit and neither side exceeds the input side, the region runs in ONE window
    (its side + the margins, up to ``input + 2 * margin``) if that window has at most ``max_pixels`` pixels: a
    1024-px tile is one 1328-px window instead of four of 816 (1.76 against 2.66 Mpx of network input)."""
    fx, fy = (geometry.fit, geometry.fit) if fit is None else fit
    a, m = geometry.align, geometry.margin
    w1, h1 = math.ceil(width / a) * a, math.ceil(height / a) * a
    if fx and fy and max(w1, h1) <= geometry.input_shape and (w1 + 2 * m) * (h1 + 2 * m) <= max_pixels:
        return TilePlan(int(width), int(height), geometry, AxisPlan(int(height), h1, m, 1),
                        AxisPlan(int(width), w1, m, 1))
    return TilePlan(int(width), int(height), geometry, plan_axis(height, geometry, fy), plan_axis(width, geometry, fx))


def coverage(plan: TilePlan) -> np.ndarray:
    """How many output crops cover each region pixel (``height x width`` int array; all ones for a valid plan)."""
    count = np.zeros((plan.height, plan.width), np.int32)
    for t in plan.tiles():
        x0, y0, x1, y1 = t.crop
        count[y0:y1, x0:x1] += 1
    return count


def cell_count(length: int, cell: int) -> int:
    """Cells of ``cell`` pixels covering ``length`` pixels (the last one may reach past the end)."""
    return math.ceil(length / cell)


def cell_weights(axis: AxisPlan, k: int, cell: int) -> tuple[int, int, np.ndarray]:
    """How window ``k``'s cells map onto the region's cell grid along ``axis``.

    Returns ``(m0, j0, w)``: ``w[i, j]`` is the weight of the window's cell ``j0 + j`` (window pixels
    ``[(j0 + j) * cell, ...)``) in region cell ``m0 + i``, the fraction of the region cell covered by both the
    window cell and the window's output crop. The crop is taken up to the region's last whole cell, so every region
    cell's weights sum to 1 over the windows of the axis.
    """
    n_cells = cell_count(axis.length, cell)
    c0 = k * axis.output
    c1 = min((k + 1) * axis.output, n_cells * cell)
    w0 = axis.window(k)[0]
    m0, m1 = c0 // cell, cell_count(c1, cell)
    j0, j1 = max((c0 - w0) // cell, 0), min(cell_count(c1 - w0, cell), axis.input // cell)
    region_edges = np.arange(m0, m1 + 1) * cell
    window_edges = w0 + np.arange(j0, j1 + 1) * cell
    lo = np.maximum(np.maximum(region_edges[:-1, None], window_edges[None, :-1]), c0)
    hi = np.minimum(np.minimum(region_edges[1:, None], window_edges[None, 1:]), c1)
    return m0, j0, (np.clip(hi - lo, 0, None) / cell).astype(np.float32)


__all__ = ["ALIGN", "AxisPlan", "Geometry", "Tile", "TilePlan", "cell_count", "cell_weights", "coverage",
           "plan_axis", "plan_tiles"]
