"""Patch extraction: cut a dataset's images and label maps into fixed windows for training.

As in the original Cerberus (``extract_patches.py``), windows of ``win_size`` (996, twice the 448 input, so
that rotation and scaling have context before the centre crop) are placed every ``step_size`` (448; the
original used 224 for nuclei):

``valid``
    windows at 0, step, 2·step ... while they fit, plus one flush with the bottom/right edge when a
    remainder is left; an image smaller than the window is first reflect-padded symmetrically.
``mirror``
    reflect-pad by (win − step) / 2 on each side, then as ``valid``, so every pixel is near some
    window's centre.

Before any window is cut, every image, tissue mask and label map is brought to one resolution ``mpp`` (the
model's; by default the dataset's own ``mpp``), image by image since images may differ (``mpps.csv``): window
sizes are in pixels at that resolution. Windows with no tissue-mask pixel are skipped. Each patch is one
``.npz`` (no pickle) holding ``image`` (uint8 H x W x 3) and, per task, ``{task}_inst`` and ``{task}_type``
(int32 maps) or ``{task}_class_map``; patch-classification datasets give one patch per image with the scalar
``{task}_class``. An image with a labelled region (``regions/NAME.png``, :meth:`~cerberus_histo.data.dataset.
DatasetSpec.read_region`: only part of it was annotated) adds ``labelled`` (uint8 H x W, 1 = labelled, brought
to ``mpp`` and padded like the labels) to each of its patches, and its windows with no labelled pixel are
skipped (``unlabelled_windows``); only labelled pixels carry a loss in training. Patches of fully labelled
images have no ``labelled`` array. Output: ``OUT/{dataset}/split_{k}/{win}_{step}/{image}-{idx:04d}.npz``, ``OUT/{dataset}/
patches.json`` (the resolution, window, step and mode, the images' own resolutions, and ``complete``, true once
every image is done) and a marker per finished image (``done/{image}.json`` beside its patches,
:func:`~cerberus_histo.io.files.write_marker`), so a re-run (after a full disk, too) skips finished images. A re-run with other settings into the same folder is an
error rather than a mix of two patch sets. Reflect padding can duplicate an instance; the targets fix that at
training time (:func:`cerberus_histo.data.targets.fix_mirror_padding`).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import CerberusError
from ..io.files import json_text, read_marker, write_marker
from ..io.readers import resize
from .dataset import DatasetSpec, atomic_write_bytes, load_dataset
from .resolution import far_message, resample_annotation, resample_map, same_mpp, scaled_shape
from .targets import type_target

MODES = ("valid", "mirror")
META_FILE = "patches.json"


def window_starts(length: int, win: int, step: int) -> list[int]:
    """Start offsets along one axis of length >= win: every ``step``, plus one flush with the end."""
    if length < win:
        raise ValueError(f"length {length} is smaller than the window {win}; pad first")
    starts = list(range(0, length - win + 1, step))
    if starts[-1] != length - win:
        starts.append(length - win)
    return starts


def _pad_widths(shape: tuple[int, int], win: int, step: int, mode: str) -> list[tuple[int, int]]:
    pads = []
    for n in shape:
        before = after = (win - step) // 2 if mode == "mirror" else 0
        short = win - (n + before + after)
        if short > 0:  # smaller than a window: pad symmetrically
            before, after = before + (short + 1) // 2, after + short // 2
        pads.append((before, after))
    return pads


def windows(shape: tuple[int, int], win: int, step: int, mode: str = "valid"):
    """``(pads, [(y, x), ...])``: padding of each axis and window origins in the padded image."""
    if mode not in MODES:
        raise CerberusError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not (0 < step <= win):
        raise CerberusError(f"--step-size must be in 1..--win-size ({win}), got {step}")
    pads = _pad_widths(shape, win, step, mode)
    h, w = (n + a + b for n, (a, b) in zip(shape, pads, strict=True))
    return pads, [(y, x) for y in window_starts(h, win, step) for x in window_starts(w, win, step)]


@dataclass
class ExtractionReport:
    mpp: float = 0.0
    images: int = 0
    skipped_images: int = 0
    patches: int = 0
    empty_windows: int = 0       # no tissue-mask pixel
    unlabelled_windows: int = 0  # tissue, but no pixel of the image's labelled region


def _label_maps(spec: DatasetSpec, name: str, shape: tuple[int, int], to_shape: tuple[int, int]):
    maps = {}
    for ann in spec.annotations:
        if ann.kinds == ("class",):
            continue
        a = resample_annotation(spec.read_annotation(name, ann.task, shape), to_shape)
        if a.inst_map is not None:
            maps[f"{ann.task}_inst"] = a.inst_map
            if a.classes is not None:
                maps[f"{ann.task}_type"] = type_target(a.inst_map, a.ids, a.classes)
        if a.class_map is not None:
            maps[f"{ann.task}_class_map"] = a.class_map
    return maps


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_meta(folder: str | Path) -> dict | None:
    """The ``patches.json`` of one dataset's patch folder, or ``None`` when it has none."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CerberusError(f"{path} is not readable JSON ({type(exc).__name__}); re-extract the patches") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("mpp"), (int, float)):
        raise CerberusError(f"{path}: no 'mpp' (the patches' resolution); re-extract the patches")
    return meta


def _check_meta(folder: Path, meta: dict) -> None:
    """Write ``patches.json`` (``complete`` false until every image is done), or check that an earlier extraction
    into ``folder`` used the same settings."""
    old = read_meta(folder)
    keys = ("mpp", "win_size", "step_size", "mode")
    if old is None:
        if any(folder.rglob("*.npz")):
            raise CerberusError(f"{folder} holds patches of unknown settings (no {META_FILE}); choose another --out "
                                "or remove that folder")
        atomic_write_bytes(folder / META_FILE, json_text({**meta, "complete": False}, indent=2).encode())
    elif any(old.get(k) != meta[k] and not (k == "mpp" and same_mpp(old[k], meta[k])) for k in keys):
        was = ", ".join(f"{k} {old.get(k)}" for k in keys)
        now = ", ".join(f"{k} {meta[k]}" for k in keys)
        raise CerberusError(f"{folder} holds patches extracted with {was}; these settings ({now}) would mix two "
                            "patch sets: choose another --out or remove that folder")


def extract_patches(config: str | Path, out: str | Path, win_size: int = 996, step_size: int = 448,
                    mode: str = "valid", progress: bool = True, mpp: float | None = None) -> ExtractionReport:
    """Extract the patches of every image listed in the dataset's split CSV at resolution ``mpp`` (default:
    the dataset's ``mpp``); see the module docstring."""
    if Path(out).exists() and not Path(out).is_dir():
        raise CerberusError(f"--out {out} exists and is not a folder; choose a folder path")
    if win_size < 1:
        raise CerberusError(f"--win-size must be a positive number of pixels (e.g. 996), got {win_size}")
    spec = load_dataset(config)
    names = spec.check_files()
    splits = spec.splits()
    image_mpps = {name: spec.image_mpp(name) for name in names}
    to_mpp = float(spec.mpp if mpp is None else mpp)
    if not to_mpp > 0:
        raise CerberusError(f"--mpp must be microns per pixel > 0, got {mpp}")
    out = Path(out) / spec.name
    class_tasks = [a.task for a in spec.annotations if a.kinds == ("class",)]
    if not class_tasks:
        windows((win_size, win_size), win_size, step_size, mode)  # bad --win-size/--step-size/--mode: fail first
    lo, hi = min(image_mpps.values()), max(image_mpps.values())
    message = far_message(f"dataset {spec.name!r}", max(lo, hi, key=lambda m: max(m / to_mpp, to_mpp / m)), to_mpp)
    if message:
        warnings.warn(message, stacklevel=2)
    _check_meta(out, {"dataset": spec.name, "mpp": to_mpp, "win_size": None if class_tasks else win_size,
                      "step_size": None if class_tasks else step_size, "mode": None if class_tasks else mode,
                      "dataset_mpp": float(spec.mpp), "image_mpp_range": [lo, hi]})
    report = ExtractionReport(mpp=to_mpp)
    image_classes = {t: spec.image_classes(t) for t in class_tasks}
    for name in tqdm(names, desc=f"extract {spec.name}", unit="image", disable=None if progress else True):
        folder = out / f"split_{splits[name]}" / (f"{win_size}_{step_size}" if not class_tasks else "")
        settings = {"mpp": to_mpp, "image_mpp": image_mpps[name], "win_size": None if class_tasks else win_size,
                    "step_size": None if class_tasks else step_size, "mode": None if class_tasks else mode}
        done = read_marker(folder, name)  # done/{name}.json; an earlier version's .done/ is not read: redone
        if done is not None and done.get("settings") == json.loads(json_text(settings)):
            report.skipped_images += 1
            continue
        image = spec.read_image(name)
        shape = image.shape[:2]
        to_shape = scaled_shape(shape, image_mpps[name], to_mpp)
        image = resize(image, to_shape[::-1])
        written = []
        if class_tasks:  # patch classification: the whole image is the patch
            arrays = {"image": image, **{f"{t}_class": np.int32(image_classes[t][name]) for t in class_tasks}}
            _save_npz(folder / f"{name}.npz", arrays)
            written.append(f"{name}.npz")
        else:
            mask = resample_map(spec.read_mask(name, shape), to_shape)
            maps = {"image": image, "_mask": mask, **_label_maps(spec, name, shape, to_shape)}
            region = spec.read_region(name, shape)
            if region is not None:  # partly annotated: only these pixels are labelled
                maps["labelled"] = resample_map(region, to_shape).astype(np.uint8)
            pads, origins = windows(to_shape, win_size, step_size, mode)
            if any(a or b for a, b in pads):
                maps = {k: np.pad(v, pads + [(0, 0)] * (v.ndim - 2), mode="reflect") for k, v in maps.items()}
            for idx, (y, x) in enumerate(origins):
                crop = {k: v[y:y + win_size, x:x + win_size] for k, v in maps.items()}
                if not crop.pop("_mask").any():
                    report.empty_windows += 1
                    continue
                if "labelled" in crop and not crop["labelled"].any():
                    report.unlabelled_windows += 1
                    continue
                fname = f"{name}-{idx:04d}.npz"
                _save_npz(folder / fname, crop)
                written.append(fname)
        report.images += 1
        report.patches += len(written)
        write_marker(folder, name, {"settings": settings, "patches": written, "image_mpp": image_mpps[name],
                                    "mpp": to_mpp})  # last, atomically: the image is finished
    if read_meta(out).get("complete") is not True:  # every image is done: the patch set is complete
        atomic_write_bytes(out / META_FILE, json_text({**read_meta(out), "complete": True}, indent=2).encode())
    return report


def load_patch(path: str | Path) -> dict[str, np.ndarray]:
    """Read one patch file (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001
        raise CerberusError(f"{path} is not a readable patch file ({type(exc).__name__}); re-extract it") from None
