"""Whole-slide readers: :func:`open_slide` gives a :class:`~.readers.Reader` for any slide or large image.

Backends, in order: OpenSlide (SVS, NDPI, MRXS, SCN, generic tiled TIFF, ...; via openslide-bin), tiffslide (a
pure-Python fallback for TIFF-based slides OpenSlide does not open), and plain images (PNG, JPEG, BMP, untiled
TIFF) read whole into an :class:`~.readers.ArrayReader`. The slide's mpp comes from its metadata (OpenSlide's
``openslide.mpp-x``, tiffslide's ``tiffslide.mpp-x``, TIFF resolution tags) unless ``mpp=`` overrides it; a
slide without one is a one-line error asking for ``--mpp``, never a guess.

Scanners write slides with damaged tiles. A read that fails is retried once on a freshly opened file (OpenSlide
refuses every read of a handle after one error); when it fails again, the reader raises (``unreadable="raise"``,
the default) or, with ``unreadable="record"``, reads the region file tile by file tile, fills the tiles that stay
unreadable with white and records their level-0 boxes in ``reader.unreadable`` (what a slide run reports).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import CerberusError
from .readers import IMAGE_SUFFIXES, ArrayReader, Reader, check_mpp, read_image

MPP_RANGE = (0.01, 50.0)  # plausible microscope resolutions; 72-dpi defaults (353 um/px) fall outside
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
UNREADABLE_MODES = ("raise", "record")
FILE_TILE = 256  # the tile side assumed for a level whose metadata gives none (salvaging a failed read)


class MppError(CerberusError):
    """The slide's metadata has no (plausible) mpp; the message asks for ``--mpp``."""


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's log lines while probing a file that may be broken (the error we raise says it all)."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _rgba_to_rgb(a: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha, as OpenSlide returns it) composited on white; RGB passes through."""
    if a.ndim == 3 and a.shape[2] == 4:
        alpha = a[..., 3:].astype(np.uint16)
        if alpha.min() == 255:
            return np.ascontiguousarray(a[..., :3])
        rgb = (a[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


class SlideReader(Reader):
    """A pyramidal slide read through OpenSlide or tiffslide; see :class:`~.readers.Reader` for ``read_region``.

    ``level_mpps`` lists each level's mpp, ``properties`` the slide's metadata (string values), ``backend`` is
    ``"openslide"`` or ``"tiffslide"``. ``unreadable``: what a read that fails twice does (see the module
    docstring): ``"raise"`` a one-line error, or ``"record"`` its file tiles that stay unreadable, white, in
    ``self.unreadable`` (level-0 boxes ``(x, y, w, h)``, in the order met). Readers pickle by path (they reopen
    the file), so they can go to workers.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, backend: str = "openslide",
                 unreadable: str = "raise"):
        self.path = Path(path)
        self.name = self.path.name
        self.backend = backend
        self._mpp_override = mpp
        if backend not in ("openslide", "tiffslide"):
            raise ValueError(f"unknown slide backend {backend!r}; use 'openslide' or 'tiffslide'")
        if unreadable not in UNREADABLE_MODES:
            raise ValueError(f"unreadable must be one of {UNREADABLE_MODES}, got {unreadable!r}")
        self.on_unreadable = unreadable
        self.unreadable: list[tuple[int, int, int, int]] = []
        self._recovering = threading.Lock()  # after a failed read, reads go one at a time (see _read_level)
        self._serial = False
        self._slide = None
        try:
            self._slide = self._open()
        except Exception as exc:  # whatever the backend raises, the file is at fault
            raise CerberusError(f"{self.path}: cannot open this slide ({_first_line(exc)}); it may be truncated or "
                                "corrupt, copy it again") from None
        self.dimensions = tuple(int(v) for v in self._slide.dimensions)
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        try:
            self.mpp = check_mpp(mpp, "--mpp") if mpp is not None else _metadata_mpp(self.path, self.properties, backend)
            self._probe()
        except CerberusError:
            self.close()
            raise

    def _open(self):
        """A new handle on the file."""
        if self.backend == "openslide":
            import openslide

            return openslide.OpenSlide(str(self.path))
        import tiffslide

        with _quiet_tifffile():
            return tiffslide.TiffSlide(str(self.path))

    @property
    def properties(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._slide.properties.items() if v is not None}

    def _decode(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The backend's read of ``(x, y, w, h)`` in ``level``'s pixels, as RGB; raises what the backend raises."""
        slide = self._slide  # this call keeps its handle alive even if another thread replaces it
        d = self.level_downsamples[level]
        location = (round(x * d), round(y * d))
        if self.backend == "tiffslide":
            return _rgba_to_rgb(np.asarray(slide.read_region(location, level, (w, h), as_array=True)))
        return _rgba_to_rgb(np.asarray(slide.read_region(location, level, (w, h))))

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if not self._serial:
            try:
                return self._decode(level, x, y, w, h)
            except Exception:  # retried below on a new handle: OpenSlide refuses every read of one that failed
                pass
        # one read at a time from the first failure on: reads in parallel on one handle would fail with another
        # region's error, and a read must never meet a handle being replaced
        with self._recovering:
            self._serial = True
            try:
                return self._decode(level, x, y, w, h)
            except Exception:
                self._reopen()
            try:  # the retry
                return self._decode(level, x, y, w, h)
            except Exception as exc:
                self._reopen()
                if self.on_unreadable == "raise":
                    raise CerberusError(f"{self.path}: cannot read level {level} at ({x}, {y}) "
                                        f"({_first_line(exc)}); the slide may be truncated or corrupt, copy it "
                                        "again") from None
            return self._salvage(level, x, y, w, h)

    def _reopen(self) -> None:
        """Replace the handle with a new one (the old one closes when no read uses it any more)."""
        try:
            self._slide = self._open()
        except Exception as exc:
            raise CerberusError(f"{self.path}: cannot open this slide again after a read failed "
                                f"({_first_line(exc)}); is the file still there?") from None

    def _salvage(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """The region read one file tile at a time (each tried twice): the tiles that stay unreadable are white
        and their level-0 boxes are added to :attr:`unreadable`."""
        out = np.full((h, w, 3), 255, np.uint8)
        tw, th = self._tile_size(level)
        lw, lh = self.level_dimensions[level]
        d = self.level_downsamples[level]
        for ty in range(y // th * th, y + h, th):  # the box lies inside the level
            for tx in range(x // tw * tw, x + w, tw):
                x0, y0, x1, y1 = max(x, tx), max(y, ty), min(x + w, tx + tw, lw), min(y + h, ty + th, lh)
                for _attempt in (0, 1):
                    try:
                        out[y0 - y:y1 - y, x0 - x:x1 - x] = self._decode(level, x0, y0, x1 - x0, y1 - y0)
                        break
                    except Exception:
                        self._reopen()
                else:
                    box = (round(tx * d), round(ty * d), round(min(tw, lw - tx) * d), round(min(th, lh - ty) * d))
                    if box not in self.unreadable:
                        self.unreadable.append(box)
        return out

    def _tile_size(self, level: int) -> tuple[int, int]:
        """The file's tile size at ``level`` from the metadata (``FILE_TILE`` where it gives none)."""
        props = self._slide.properties
        out = []
        for axis in ("width", "height"):
            try:
                out.append(max(1, int(props.get(f"{self.backend}.level[{level}].tile-{axis}"))))
            except (TypeError, ValueError):
                out.append(FILE_TILE)
        return out[0], out[1]

    def _probe(self) -> None:
        """Decode one pixel at both ends of level 0 and of the coarsest level, so a truncated file fails now."""
        for level in (0, len(self.level_dimensions) - 1):
            lw, lh = self.level_dimensions[level]
            for x, y in ((0, 0), (lw - 1, lh - 1)):
                try:
                    self._decode(level, x, y, 1, 1)
                except Exception as exc:
                    raise CerberusError(f"{self.path}: cannot read level {level} at ({x}, {y}) "
                                        f"({_first_line(exc)}); the slide may be truncated or corrupt, copy it "
                                        "again") from None

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "mpp": self._mpp_override, "backend": self.backend,
                "unreadable": self.on_unreadable}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["mpp"], state["backend"], state.get("unreadable", "raise"))


def _metadata_mpp(path: Path, props: dict[str, str], backend: str) -> float:
    """The slide's level-0 mpp from its metadata, or a one-line error asking for ``--mpp``."""
    values = []
    for axis in ("x", "y"):
        try:
            values.append(float(props.get(f"{backend}.mpp-{axis}", "")))
        except ValueError:  # absent or not a number
            pass
    return _checked_mpp(path, values or _tiff_mpp(path))


def _checked_mpp(path: Path, values: list[float]) -> float:
    values = [v for v in values if np.isfinite(v) and v > 0]
    if not values:
        raise MppError(f"{path} has no microns-per-pixel in its metadata; pass --mpp (e.g. --mpp 0.5 for 20x)")
    if max(values) > min(values) * 1.01:
        warnings.warn(f"{path.name}: pixels are not square (mpp {values[0]:g} x {values[1]:g}); using the mean",
                      stacklevel=3)
    mpp = float(np.mean(values))
    if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise MppError(f"{path}: its metadata says {mpp:g} microns per pixel, which is no microscope "
                            "resolution (a default DPI?); pass --mpp")
    return mpp


def _tiff_mpp(path: Path) -> list[float]:
    """mpp (x, y) from the first page's TIFF resolution tags; empty when absent or unit-less."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit = tags.get("ResolutionUnit")
            per_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit is not None else 2)
            out = []
            for name in ("XResolution", "YResolution"):
                tag = tags.get(name)
                if tag is None or per_um is None:
                    return []
                num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
                out.append(per_um * den / num if num else 0.0)
            return out
    except Exception:
        return []


def open_slide(path: str | Path, mpp: float | None = None, unreadable: str = "raise") -> Reader:
    """A :class:`~.readers.Reader` for a slide or image file; ``mpp`` overrides the metadata's level-0 mpp;
    ``unreadable`` is what a pyramidal slide's damaged tiles do (:class:`SlideReader`; a plain image is read whole
    when opened).

    Raises a one-line :class:`CerberusError` for a missing, empty, non-slide or corrupt file and for a file with
    no mpp in its metadata when ``mpp`` is not given.
    """
    path = Path(path)
    if not path.exists():
        raise CerberusError(f"{path}: slide not found; check the path")
    if not path.is_file():
        raise CerberusError(f"{path} is not a file; pass the slide file itself (for MRXS the .mrxs file)")
    if path.stat().st_size == 0:
        raise CerberusError(f"{path} is empty (0 bytes); copy the slide again")
    if mpp is not None:
        mpp = check_mpp(mpp, "--mpp")
    with open(path, "rb") as f:
        head = f.read(16)
    is_tiff = head.startswith(TIFF_SIGNATURES)

    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    if fmt is not None:
        try:
            return SlideReader(path, mpp, "openslide", unreadable)
        except MppError:
            raise
        except CerberusError as exc:
            if not is_tiff:
                raise
            error = exc  # OpenSlide failed on a TIFF: let tiffslide try before giving up
    else:
        error = None
    if is_tiff:
        if _is_tiled_tiff(path):
            try:
                with _quiet_tifffile():
                    return SlideReader(path, mpp, "tiffslide", unreadable)
            except MppError:
                raise
            except CerberusError as exc:
                raise error or exc from None
        if error is not None:
            raise error
    if not is_tiff and not _looks_like_image(head):
        raise CerberusError(f"{path} is not a slide OpenSlide can read, nor an image ({', '.join(IMAGE_SUFFIXES)}); "
                            "is it a text file or an incomplete download?")
    return _open_plain(path, mpp, is_tiff)


def _is_tiled_tiff(path: Path) -> bool:
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            return bool(tif.pages[0].is_tiled) or len(tif.series[0].levels) > 1
    except Exception as exc:
        raise CerberusError(f"{path}: cannot read this TIFF ({_first_line(exc)}); it may be truncated or corrupt, "
                            "copy it again") from None


def _looks_like_image(head: bytes) -> bool:
    return head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"BM"))


def _open_plain(path: Path, mpp: float | None, is_tiff: bool) -> ArrayReader:
    """A plain (one-level) image read whole; mpp from ``mpp`` or the TIFF resolution tags."""
    if mpp is None:
        mpp = _checked_mpp(path, _tiff_mpp(path) if is_tiff else [])
    image = read_image(path)
    reader = ArrayReader(image, mpp, name=path.name)
    reader.path = path
    return reader
