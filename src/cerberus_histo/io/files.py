"""Small file helpers shared across the package: atomic writes, strict JSON, the one PNG encoder, and YAML mappings
with one-line errors; a write that fails for want of space (:func:`no_space_error`) is one line too."""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from ..errors import CerberusError

# ---- a disk that is full --------------------------------------------------------------------------------
#: the errors of a write that found no room: the device is full, a quota is used up, a file-size limit was reached
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
#: SQLite's names of the same (SQLITE_FULL; a failed write(2), as an ``EFBIG``/``EDQUOT`` is reported)
_SQLITE_NO_SPACE = frozenset({"SQLITE_FULL", "SQLITE_IOERR_WRITE"})
#: what ``torch.save`` says when its file stream fails (it keeps no errno)
_TORCH_WRITE_FAILED = ("unexpected pos", "failed writing file", "file write failed")


class NoSpaceError(CerberusError):
    """A write failed because the device (or a quota) is full or a file-size limit was reached. Nothing that looks
    finished was left: the command stops (it does not go on to fail every other slide or image), and the same
    command run again once there is room resumes. ``path``: the file it names."""

    path: str | Path | None = None


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a write that found no room: an ``OSError`` with errno
    ``ENOSPC``, ``EFBIG`` or ``EDQUOT``, SQLite's "database or disk is full" or failed write, or the
    ``RuntimeError`` of ``torch.save`` whose file stream failed."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, NoSpaceError):
            return True
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        if getattr(exc, "sqlite_errorname", None) in _SQLITE_NO_SPACE or str(exc) == "database or disk is full":
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_FAILED):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


_RESUMES = "run the same command again: it resumes"


def _named_file(exc: BaseException | None) -> str | Path | None:
    """The file the first error of ``exc``'s chain that names one names (a :class:`NoSpaceError`'s ``path``, an
    ``OSError``'s ``filename``): a failure while handling the first may name none."""
    for _ in range(8):
        if exc is None:
            return None
        where = getattr(exc, "path", None) if isinstance(exc, NoSpaceError) else getattr(exc, "filename", None)
        if where:
            return where
        exc = exc.__cause__ or exc.__context__
    return None


def no_space_error(exc: BaseException, path: str | Path | None = None, then: str = _RESUMES,
                   default: str | Path | None = None) -> NoSpaceError | None:
    """The one-line error of a write that found no room (:func:`is_no_space`), else None: it names the file
    (``path``, the one the code was writing; else the one a :class:`NoSpaceError` or ``OSError`` of the chain
    names; else ``default``, such as the output folder) and what to do (free space, then ``then``). A
    :class:`NoSpaceError` that already says so is returned as it is."""
    if not is_no_space(exc):
        return None
    where = path if path is not None else _named_file(exc) or default
    if isinstance(exc, NoSpaceError) and (where is None or str(where) == str(getattr(exc, "path", None))) \
            and then == _RESUMES:
        return exc
    err = NoSpaceError(f"cannot write {where or 'a file'}: no space left on the device (or a file-size limit "
                       f"reached); free space, then {then}")
    err.path = where
    return err


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place, so no
    half-written file is ever visible under ``path`` (the temporary file is removed when writing fails). A write
    that finds no room is a one-line :class:`NoSpaceError` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        if (err := no_space_error(exc, path)) is not None:
            raise err from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _json_key(key):
    if isinstance(key, np.generic):
        key = key.item()
    return key if key is None or isinstance(key, (str, int, float, bool)) else str(key)


def json_ready(value):
    """``value`` as strict JSON can hold it: NaN and infinities -> ``None`` (``null``), numpy scalars and arrays ->
    Python numbers and lists, tuples -> lists, paths -> strings; dict keys that JSON cannot take -> strings."""
    if isinstance(value, dict):
        return {_json_key(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def json_text(value, **kwargs) -> str:
    """Strict JSON text of ``value`` (``json.dumps`` with ``allow_nan=False``; ``kwargs`` as there): a NaN or an
    infinity is written ``null`` (:func:`json_ready`), never the bare ``NaN`` / ``Infinity`` that JSON lacks and
    strict readers (JavaScript, jq, Go) reject. Every JSON the package writes is made here."""
    try:  # the common case, at json's own speed
        return json.dumps(value, allow_nan=False, **kwargs)
    except (ValueError, TypeError):
        return json.dumps(json_ready(value), allow_nan=False, **kwargs)


def write_json(path: Path, value, indent: int | None = 2) -> None:
    """``value`` as strict JSON (:func:`json_text`), written atomically."""
    atomic_write_bytes(Path(path), json_text(value, indent=indent).encode())


def encode_image(image: np.ndarray, suffix: str = ".png", fast: bool = False) -> bytes:
    """A ``uint8`` image, single-channel, RGB (``H x W x 3``) or RGBA (``H x W x 4``, straight alpha), encoded in the
    format of ``suffix`` (``.png`` unless told; ``.jpg``, ``.tif`` as OpenCV writes them). ``fast``: the quickest PNG
    compression (the viewer's many small tiles). The one image encoder of the package: PNG is encoded only here."""
    import cv2

    arr = np.ascontiguousarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA if arr.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1] if fast and suffix.lower() == ".png" else []
    ok, buf = cv2.imencode(suffix or ".png", arr, params)
    if not ok:
        raise CerberusError(f"could not encode an image of shape {arr.shape} as {suffix or '.png'}")
    return buf.tobytes()


def write_image(path: Path, image: np.ndarray) -> None:
    """``image`` (as :func:`encode_image` takes it) in the format of the path's suffix (PNG without one), written
    atomically."""
    path = Path(path)
    try:
        data = encode_image(image, path.suffix or ".png")
    except CerberusError:
        raise CerberusError(f"could not encode {path} (shape {np.shape(image)})") from None
    atomic_write_bytes(path, data)


def write_png(path: Path, image: np.ndarray) -> None:
    """A single-channel, RGB or RGBA ``uint8`` image as PNG, written atomically (overlays, thumbnails, tissue maps
    and masks, the demo's figures)."""
    atomic_write_bytes(Path(path), encode_image(image, ".png"))


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file that must hold a mapping; invalid YAML or another type is a one-line error."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CerberusError(f"{path} is not valid YAML ({str(exc).strip().splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CerberusError(f"{path} must hold a YAML mapping")
    return data


# ---- finished work: done/ markers -------------------------------------------------------------------------
#: the folder, inside an output folder, of the completion markers: ``{folder}/done/{name}.json``
MARKER_DIR = "done"


def marker_path(folder: Path, name: str) -> Path:
    """The completion marker of ``name`` (an image, a slide, a demo stage) in ``folder``:
    ``{folder}/done/{name}.json``."""
    return Path(folder) / MARKER_DIR / f"{name}.json"


def read_marker(folder: Path, name: str) -> dict | None:
    """The marker's content, or None when there is none or it cannot be read (then the work is done again).
    Markers of earlier versions (``.done/``, ``.demo/``) are not read: that work is done again."""
    try:
        done = json.loads(marker_path(folder, name).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def write_marker(folder: Path, name: str, content: dict) -> Path:
    """Write the marker (strict JSON, atomically) as the last file of the finished work, holding ``content``: the
    settings it was made with and what it wrote; returns its path."""
    path = marker_path(folder, name)
    write_json(path, content)
    return path
