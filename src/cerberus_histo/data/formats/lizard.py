"""Lizard (Graham et al., 2021): colon H&E tiles at 20x with nucleus instances of six classes.

Source format (anywhere under ``src``, searched recursively): the images ``*.png`` (the release has
``lizard_images1/Lizard_Images1/`` and ``lizard_images2/Lizard_Images2/``) and one ``.mat`` per image with the
same stem (``lizard_labels/Lizard_Labels/Labels/``) holding ``inst_map`` (H x W), ``id`` and ``class``
(N x 1 column vectors), ``bbox`` and ``centroid`` (not used). PNGs under a folder named ``Overlay`` (the
release's label overlays) and PNGs without a ``.mat`` are not images of the dataset and are skipped.

Classes map one to one onto the ``nuclei`` task: 1 neutrophil, 2 epithelial, 3 lymphocyte, 4 plasma,
5 eosinophil, 6 connective. Only ids present in ``inst_map`` are written (a listed id without pixels is
dropped); an id in ``inst_map`` that is not listed is an error.

Splits: ``info.csv`` (``Filename,Source,Split``, Split 1..3) when present under ``src``; otherwise round-robin
over the sorted names into 3 splits. Default resolution 0.5 um/px (20x).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...errors import CerberusError
from ..dataset import Annotation, AnnotationSpec, DatasetSpec, read_rgb
from .common import DatasetWriter, find_files

DEFAULT_MPP = 0.5
NUM_SPLITS = 3


def import_lizard(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True) -> DatasetSpec:
    """Convert the Lizard release at ``src`` into the common layout at ``dst``."""
    src, dst = Path(src), Path(dst)
    mats = find_files(src, (".mat",))
    if not mats:
        raise CerberusError(f"{src}: no Lizard labels (*.mat with inst_map, id, class) found")
    images = _images_by_stem(src)
    for mat in mats:
        if mat.stem not in images:
            raise CerberusError(f"{mat}: no image {mat.stem}.png found under {src}")
    seen: dict[str, Path] = {}
    for mat in mats:
        if mat.stem in seen:
            raise CerberusError(f"two label files for {mat.stem!r}: {seen[mat.stem]} and {mat}; keep one")
        seen[mat.stem] = mat
    names = sorted(seen)
    splits = _read_info(src, names)
    writer = DatasetWriter(dst, "lizard", mpp=mpp or DEFAULT_MPP, num_splits=NUM_SPLITS,
                           annotations=(AnnotationSpec("nuclei", ("inst", "type"), dir="labels/nuclei"),),
                           description="Lizard: colon H&E at 20x, nucleus instances of six classes")
    for name in tqdm(names, desc="import lizard", unit="image", disable=None if progress else True):
        image = read_rgb(images[name])
        ann = _read_mat(seen[name])
        if ann.inst_map.shape != image.shape[:2]:
            raise CerberusError(f"{seen[name]}: inst_map shape {ann.inst_map.shape} differs from its image "
                                f"{images[name]} {image.shape[:2]}")
        writer.add(name, image, {"nuclei": ann}, split=splits[name])
    return writer.finish()


def _images_by_stem(src: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in find_files(src, (".png",)):
        if any(part.lower() == "overlay" for part in path.relative_to(src).parts[:-1]):
            continue
        if path.stem in out:
            raise CerberusError(f"two images named {path.stem!r}: {out[path.stem]} and {path}; keep one")
        out[path.stem] = path
    return out


def _read_mat(path: Path) -> Annotation:
    from scipy.io import loadmat

    try:
        raw = loadmat(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user error
        raise CerberusError(f"{path} is not a readable .mat file ({type(exc).__name__})") from None
    for key in ("inst_map", "id", "class"):
        if key not in raw:
            raise CerberusError(f"{path}: no {key!r} array; a Lizard label holds inst_map, id and class")
    inst = _integers(raw["inst_map"], path, "inst_map")
    if inst.ndim != 2:
        raise CerberusError(f"{path}: inst_map must be 2-D, got shape {inst.shape}")
    ids = _integers(raw["id"], path, "id").ravel()
    classes = _integers(raw["class"], path, "class").ravel()
    if ids.size != classes.size:
        raise CerberusError(f"{path}: {ids.size} ids but {classes.size} classes")
    if np.unique(ids).size != ids.size:
        raise CerberusError(f"{path}: the id list repeats an id")
    present = np.unique(inst)
    present = present[present > 0]
    missing = np.setdiff1d(present, ids)
    if missing.size:
        raise CerberusError(f"{path}: inst_map holds id(s) {missing[:5].tolist()} that are not in the id list")
    keep = np.isin(ids, present)
    ids, classes = ids[keep], classes[keep]
    if classes.size and (classes.min() < 0 or classes.max() > 6):
        raise CerberusError(f"{path}: class holds ids outside 0..6 (Lizard classes are 1..6)")
    return Annotation(inst_map=inst, ids=ids, classes=classes)


def _integers(arr, path: Path, key: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr))):
        raise CerberusError(f"{path}: {key} must hold integers, got {arr.dtype}")
    return arr.astype(np.int32)


def _read_info(src: Path, names: list[str]) -> dict[str, int]:
    """Splits from ``info.csv`` when there is one, else round-robin over the sorted names."""
    infos = sorted(p for p in src.rglob("*") if p.name.lower() == "info.csv" and p.is_file())
    if not infos:
        return {name: i % NUM_SPLITS + 1 for i, name in enumerate(names)}
    if len(infos) > 1:
        raise CerberusError(f"several info.csv under {src}: {infos[0]} and {infos[1]}; keep one")
    path = infos[0]
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if "Filename" not in fields or "Split" not in fields:
            raise CerberusError(f"{path}: expected columns Filename,Source,Split, got {','.join(fields)}")
        rows = [{k.strip(): v.strip() for k, v in row.items() if k is not None and v is not None} for row in reader]
    splits = {}
    for line, row in enumerate(rows, start=2):
        name, value = row.get("Filename", ""), row.get("Split", "")
        name = name[:-4] if name.lower().endswith((".png", ".mat")) else name
        try:
            split = int(value)
        except ValueError:
            split = 0
        if not 1 <= split <= NUM_SPLITS:
            raise CerberusError(f"{path} line {line}: Split must be 1..{NUM_SPLITS}, got {value!r}")
        splits[name] = split
    missing = [n for n in names if n not in splits]
    if missing:
        raise CerberusError(f"{path}: no row for image(s) {', '.join(missing[:5])}")
    return {n: splits[n] for n in names}
