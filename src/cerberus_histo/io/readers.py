"""The resolution-aware reader interface, an in-memory reader, and image-file helpers. No torch.

A :class:`Reader` gives RGB uint8 regions of an image addressed in level-0 (baseline) pixels at any physical
resolution: ``read_region(location, size, mpp)``. Whole slides (:mod:`.slides`) and in-memory tiles
(:class:`ArrayReader`) share it, so one inference engine serves both.

Geometry of a region: its top-left corner is ``location`` = (x, y) in level-0 pixels and it is ``size`` = (w, h)
pixels at ``mpp``, so it covers ``size * mpp / reader.mpp`` level-0 pixels. Pixels outside the image are white.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import cv2
import numpy as np

from ..errors import CerberusError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
WHITE = 255
LEVEL_TOLERANCE = 0.01  # a level up to 1% coarser than the requested mpp still counts as "not coarser"
_SIGNATURES = {  # leading bytes of the formats read_image decodes
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "BigTIFF",
    b"MM\x00+": "BigTIFF",
    b"BM": "BMP",
}


def check_mpp(mpp: float, what: str = "mpp") -> float:
    """``mpp`` as a float, or a one-line error when it is not a positive finite number of microns per pixel."""
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise CerberusError(f"{what} must be a positive number of microns per pixel (e.g. 0.5), got {mpp!r}")
    return value


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` resized to ``size`` = (w, h): INTER_AREA when shrinking, INTER_LINEAR when enlarging."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    shrink = size[0] * size[1] < w * h
    out = cv2.resize(image, tuple(size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out[..., None] if image.ndim == 3 and out.ndim == 2 else out


class Reader:
    """Base class of readers: an image pyramid addressed in level-0 pixels, read at any mpp.

    Subclasses set ``mpp`` (level-0 microns per pixel), ``dimensions`` (level-0 (width, height)),
    ``level_dimensions`` and ``level_downsamples`` (one per pyramid level, level 0 first) and implement
    :meth:`_read_level`; this class does level choice, white padding and resampling.
    """

    mpp: float
    dimensions: tuple[int, int]
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    name: str = "image"
    path: Path | None = None  # the file read, when there is one
    backend: str = "array"

    @property
    def level_mpps(self) -> list[float]:
        """Microns per pixel of each pyramid level, level 0 first."""
        return [self.mpp * d for d in self.level_downsamples]

    @property
    def properties(self) -> dict[str, str]:
        """Metadata of the image (empty for in-memory images)."""
        return {}

    def best_level(self, mpp: float) -> int:
        """The level whose mpp is the coarsest still <= ``mpp`` (within 1%); level 0 when all are coarser."""
        best = 0
        for i, level_mpp in enumerate(self.level_mpps):
            if level_mpp <= mpp * (1 + LEVEL_TOLERANCE) and level_mpp > self.level_mpps[best]:
                best = i
        return best

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``level`` at level coordinates (x, y); the box lies inside the level."""
        raise NotImplementedError

    def _read_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Like :meth:`_read_level` for any box; the parts outside the level are white."""
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return self._read_level(level, x, y, w, h)
        out = np.full((h, w, 3), WHITE, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_region(self, location: tuple[int, int], size: tuple[int, int], mpp: float | None = None) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of the region whose top-left corner is ``location`` (x, y) in level-0 pixels
        (floats are floored) and which is ``size`` = (w, h) pixels at resolution ``mpp`` (default: level-0 mpp).
        Parts outside the image are white (255, 255, 255), so location may be negative and the region may extend
        past the image. The level read is the coarsest whose mpp is <= ``mpp`` (see :meth:`best_level`); there the
        corner snaps down to the level's pixel grid (exact when ``location`` is a multiple of its downsample)."""
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0 or (w, h) != tuple(size):
            raise ValueError(f"size must be two positive integers (w, h), got {size!r}")
        x, y = (math.floor(v) for v in location)
        target = self.mpp if mpp is None else check_mpp(mpp)
        level = self.best_level(target)
        d = self.level_downsamples[level]
        ratio = target / self.level_mpps[level]  # level pixels per output pixel
        rw, rh = max(1, round(w * ratio)), max(1, round(h * ratio))
        region = self._read_padded(level, math.floor(x / d), math.floor(y / d), rw, rh)
        return np.ascontiguousarray(resize(region, (w, h)))

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole image at about ``mpp`` (each side rounded to whole pixels), read from the best level."""
        mpp = check_mpp(mpp)
        w, h = (max(1, round(v * self.mpp / mpp)) for v in self.dimensions)
        return self.read_region((0, 0), (w, h), mpp)

    def close(self) -> None:
        """Release the file (a no-op for in-memory images)."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.dimensions[0]}x{self.dimensions[1]} px, mpp={self.mpp:g})"


class ArrayReader(Reader):
    """An in-memory image as a one-level :class:`Reader` at ``mpp`` microns per pixel.

    The image is converted to RGB uint8 by :func:`to_rgb8` (with a warning when that changes it). A region at the
    native mpp is a slice plus white padding; other mpps are resampled with INTER_AREA (down) or INTER_LINEAR (up).
    """

    def __init__(self, image: np.ndarray, mpp: float, name: str = "image"):
        self.name = name
        self._image = to_rgb8(image, name)
        self.mpp = check_mpp(mpp)
        h, w = self._image.shape[:2]
        self.dimensions = (w, h)
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]

    @property
    def image(self) -> np.ndarray:
        """The RGB uint8 image (not a copy; do not modify it)."""
        return self._image

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._image[y:y + h, x:x + w].copy()


def to_rgb8(image: np.ndarray, name: str = "") -> np.ndarray:
    """``image`` as RGB uint8 (H, W, 3). Greyscale is repeated, alpha is composited on white, 16-bit is scaled
    by 1/257, float in [0, 1] by 255 (other floats and integers are clipped to [0, 255] when they fit, else
    scaled by 255 / max), booleans become 0/255. One warning says what was converted; RGB uint8 passes unchanged.
    """
    img = np.asarray(image)
    label = f"{name}: " if name else ""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (2, 3, 4)) or img.size == 0:
        raise CerberusError(f"{label}expected an H x W greyscale, RGB or RGBA image, got shape {img.shape}")
    done = []
    if img.dtype != np.uint8:
        done.append(f"{img.dtype} to uint8")
        img = _to_uint8(img)
    if img.ndim == 2:
        done.append("greyscale to RGB")
        img = np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] in (2, 4):
        done.append(("grey+alpha" if img.shape[2] == 2 else "RGBA") + " to RGB on white")
        colour = img[..., :-1].astype(np.float32)
        if colour.shape[2] == 1:
            colour = np.repeat(colour, 3, axis=2)
        alpha = img[..., -1:].astype(np.float32) / 255.0
        img = np.rint(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if done:
        warnings.warn(f"{label}converted {', '.join(done)}", stacklevel=2)
    return img


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * 255
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        img = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if img.size and img.max() <= 1.0 else 1.0
        return np.rint(np.clip(img * scale, 0, 255)).astype(np.uint8)
    if not np.issubdtype(img.dtype, np.integer):
        raise CerberusError(f"unsupported pixel type {img.dtype}; save the image as 8-bit RGB")
    top = int(img.max())
    if top <= 255:
        return np.clip(img, 0, 255).astype(np.uint8)
    return np.rint(np.clip(img, 0, None).astype(np.float64) * (255.0 / top)).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """An image file (PNG, JPEG, TIFF, BMP) as RGB uint8 (H, W, 3), converted by :func:`to_rgb8`.

    Missing, empty, non-image and undecodable files raise a one-line :class:`CerberusError`.
    """
    return to_rgb8(read_raw(path), Path(path).name)


def read_raw(path: str | Path) -> np.ndarray:
    """An image file decoded as stored: (H, W) or (H, W, C) in RGB(A) channel order, any dtype.

    Missing, empty, non-image and undecodable files raise a one-line :class:`CerberusError`.
    """
    path = Path(path)
    if not path.exists():
        raise CerberusError(f"{path}: image not found; check the path")
    if not path.is_file():
        raise CerberusError(f"{path} is not a file; pass an image file ({', '.join(IMAGE_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise CerberusError(f"{path} is empty (0 bytes); copy or export the image again")
    with open(path, "rb") as f:
        head = f.read(16)
    kind = next((k for sig, k in _SIGNATURES.items() if head.startswith(sig)), None)
    if kind is None:
        raise CerberusError(f"{path} is not an image (expected PNG, JPEG, TIFF or BMP content)")
    try:
        if "TIFF" in kind:
            import tifffile

            img = tifffile.imread(path, key=0)
        else:
            img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
            if img is not None and img.ndim == 3 and img.shape[2] in (3, 4):  # BGR(A) -> RGB(A)
                img = img[..., [2, 1, 0, 3][:img.shape[2]]]
    except Exception as exc:  # any decoder failure is the file's fault
        raise CerberusError(f"{path}: cannot decode this {kind} file ({type(exc).__name__}); it may be truncated "
                            "or corrupt, export it again") from None
    if img is None or img.size == 0:
        raise CerberusError(f"{path}: cannot decode this {kind} file; it may be truncated or corrupt, export it again")
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[2] not in (1, 2, 3, 4):  # planar TIFF
        img = np.moveaxis(img, 0, -1)
    return img
