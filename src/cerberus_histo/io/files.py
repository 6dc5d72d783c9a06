"""Small file helpers shared across the package: atomic writes, strict JSON, the one PNG encoder, and YAML mappings
with one-line errors."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from ..errors import CerberusError


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place, so no
    half-written file is ever visible under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
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
