"""Datasets on disk: the common layout, ``dataset.yaml``, and safe reading and writing of samples.

A dataset folder (what the importers and the synthetic generator write)::

    dataset.yaml            # this description
    images/NAME.png         # RGB tiles (or patches for patch classification)
    labels/TASK/NAME.npz    # per instance task: inst_map (H x W int32), id (N), class (N); or class_map (H x W)
    masks/NAME.png          # optional tissue mask (> 0 = tissue)
    regions/NAME.png        # optional labelled region (> 0 = labelled; outside it no loss): partly annotated images
    splits.csv              # Filename,Split  (Split in 1..num_splits; <= 0 excludes the file)
    classes.csv             # patch classification only: Filename,Class (class name or index)
    mpps.csv                # optional: Filename,Mpp for images whose resolution differs from ``mpp``

``dataset.yaml`` (paths relative to its folder; the information of the original ``dataset.yml``)::

    format: cerberus-dataset
    name: glas
    mpp: 0.5
    image_dir: images
    image_ext: .png
    mask_dir: null
    region_dir: null        # or regions: the labelled part of each image (a file per image that has one)
    split_csv: splits.csv
    mpp_csv: null           # or mpps.csv: per-image resolutions (MoNuSeg's XML gives one per image)
    num_splits: 3
    annotations:
      - {task: gland, dir: labels/gland, ext: .npz, kinds: [inst, type],
         class_names: [nolabel, gland, surface-epi], class_colors: [[0,0,0], [255,255,0], [177,52,235]]}

``kinds`` are ``inst`` (instance map), ``type`` (a class per instance), ``class_map`` (per-pixel classes) and
``class`` (one class per image, from ``csv``). ``mpp`` is the resolution of every image (microns per pixel)
unless ``mpp_csv`` names a file giving some images their own (:meth:`DatasetSpec.image_mpp`). Label files are ``.npz`` (read with ``allow_pickle=False``) or
``.mat`` (the original Cerberus and Lizard format). Nothing here imports torch.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from ..errors import CerberusError
from ..io.files import atomic_write_bytes, read_yaml_mapping, write_image
from ..tasks import TASKS, from_dict

FORMAT = "cerberus-dataset"
ANNOTATION_KINDS = ("inst", "type", "class_map", "class")
LABEL_EXTS = (".npz", ".mat")


@dataclass(frozen=True)
class AnnotationSpec:
    """The labels of one task in a dataset."""

    task: str
    kinds: tuple[str, ...]
    dir: str | None = None
    ext: str = ".npz"
    csv: str | None = None
    class_names: tuple[str, ...] | None = None
    class_colors: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self):
        where = f"annotations[{self.task}]"
        kinds = tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        bad = [k for k in kinds if k not in ANNOTATION_KINDS]
        if not kinds or bad:
            raise CerberusError(f"dataset.yaml {where}.kinds: use some of {', '.join(ANNOTATION_KINDS)}, got {list(kinds)}")
        if "type" in kinds and "inst" not in kinds:
            raise CerberusError(f"dataset.yaml {where}.kinds: 'type' needs 'inst'")
        if kinds == ("class",):
            if not self.csv:
                raise CerberusError(f"dataset.yaml {where}: a 'class' annotation needs csv: (Filename,Class)")
        elif not self.dir:
            raise CerberusError(f"dataset.yaml {where}: needs dir: (the label folder)")
        if self.ext not in LABEL_EXTS:
            raise CerberusError(f"dataset.yaml {where}.ext: use {' or '.join(LABEL_EXTS)}, got {self.ext!r}")
        names = self.class_names
        if names is None and self.task in TASKS:
            names = TASKS[self.task].class_names
        if names is None and kinds != ("inst",):
            raise CerberusError(f"dataset.yaml {where}: class_names is needed for task {self.task!r}")
        object.__setattr__(self, "class_names", None if names is None else tuple(str(n) for n in names))
        colors = self.class_colors
        if colors is None and self.task in TASKS and names == TASKS[self.task].class_names:
            colors = TASKS[self.task].class_colors
        if colors is not None:
            colors = tuple(tuple(int(v) for v in c) for c in colors)
            if names is None or len(colors) != len(names):
                raise CerberusError(f"dataset.yaml {where}.class_colors: one [r, g, b] per class name")
        object.__setattr__(self, "class_colors", colors)

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


@dataclass(frozen=True)
class Annotation:
    """One image's labels for one task. ``inst_map`` with ``ids``/``classes``, and/or a ``class_map``, or the
    image's ``label`` (patch classification)."""

    inst_map: np.ndarray | None = None
    ids: np.ndarray | None = None
    classes: np.ndarray | None = None
    class_map: np.ndarray | None = None
    label: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A validated ``dataset.yaml``; ``root`` is its folder."""

    name: str
    annotations: tuple[AnnotationSpec, ...]
    root: Path = Path(".")
    mpp: float = 0.5
    image_dir: str = "images"
    image_ext: str = ".png"
    mask_dir: str | None = None
    mask_ext: str = ".png"
    region_dir: str | None = None
    split_csv: str = "splits.csv"
    mpp_csv: str | None = None
    num_splits: int = 3
    format: str = FORMAT
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))
        anns = tuple(a if isinstance(a, AnnotationSpec) else _annotation_from_dict(a) for a in self.annotations)
        if not anns:
            raise CerberusError("dataset.yaml: annotations is empty; describe at least one task's labels")
        tasks = [a.task for a in anns]
        if len(set(tasks)) != len(tasks):
            raise CerberusError(f"dataset.yaml: each task may appear once in annotations, got {tasks}")
        object.__setattr__(self, "annotations", anns)
        if self.format != FORMAT:
            raise CerberusError(f"dataset.yaml: format must be {FORMAT!r}, got {self.format!r}")
        if not isinstance(self.num_splits, int) or self.num_splits < 1:
            raise CerberusError(f"dataset.yaml num_splits: a positive integer, got {self.num_splits!r}")
        if not (isinstance(self.mpp, (int, float)) and self.mpp > 0):
            raise CerberusError(f"dataset.yaml mpp: microns per pixel > 0, got {self.mpp!r}")

    # ---- paths ------------------------------------------------------------------------------------
    def image_path(self, name: str) -> Path:
        return self.root / self.image_dir / f"{name}{self.image_ext}"

    def label_path(self, name: str, task: str) -> Path:
        ann = self.annotation(task)
        return self.root / ann.dir / f"{name}{ann.ext}"

    def mask_path(self, name: str) -> Path | None:
        return None if self.mask_dir is None else self.root / self.mask_dir / f"{name}{self.mask_ext}"

    def region_path(self, name: str) -> Path | None:
        """The labelled-region mask of ``name`` (``{region_dir}/{name}.png``), or None without a region folder."""
        return None if self.region_dir is None else self.root / self.region_dir / f"{name}.png"

    def annotation(self, task: str) -> AnnotationSpec:
        for a in self.annotations:
            if a.task == task:
                return a
        raise CerberusError(f"dataset {self.name!r} has no {task!r} labels; it has {[a.task for a in self.annotations]}")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(a.task for a in self.annotations)

    # ---- content ----------------------------------------------------------------------------------
    def splits(self) -> dict[str, int]:
        """``{name: split}`` from the split CSV (names without extension; split <= 0 excluded)."""
        rows = _read_csv(self.root / self.split_csv, ("Filename", "Split"))
        out = {}
        for i, row in enumerate(rows, start=2):
            try:
                split = int(row["Split"])
            except ValueError:
                raise CerberusError(f"{self.root / self.split_csv} line {i}: Split must be an integer") from None
            if split > self.num_splits:
                raise CerberusError(f"{self.root / self.split_csv} line {i}: Split {split} > num_splits {self.num_splits}")
            if split > 0:
                out[Path(row["Filename"]).stem if row["Filename"].endswith(self.image_ext) else row["Filename"]] = split
        return out

    def names(self, split: int | None = None) -> list[str]:
        """Sorted image names, of one split or of all."""
        names = sorted(n for n, s in self.splits().items() if split is None or s == split)
        if split is not None and not names:
            raise CerberusError(f"{self.root / self.split_csv}: split {split} of dataset {self.name!r} is empty")
        return names

    def check_files(self) -> list[str]:
        """Check that every image listed in the split CSV has its image and label files (and mask); returns
        the names. Raises on the first missing file, naming it."""
        names = self.names()
        classes = {a.task: self.image_classes(a.task) for a in self.annotations if a.kinds == ("class",)}
        for name in names:
            paths = [self.image_path(name)] + [self.label_path(name, a.task) for a in self.annotations if a.dir]
            if self.mask_dir is not None:
                paths.append(self.mask_path(name))
            for path in paths:
                if not path.is_file():
                    raise CerberusError(f"{path}: missing (listed as {name!r} in {self.root / self.split_csv})")
            for task, table in classes.items():
                if name not in table:
                    raise CerberusError(f"{self.root / self.annotation(task).csv}: no class for image {name!r}")
        return names

    def image_classes(self, task: str) -> dict[str, int]:
        """Per-image classes of a patch-classification annotation (class names or indices in the CSV)."""
        ann = self.annotation(task)
        path = self.root / ann.csv
        out = {}
        for i, row in enumerate(_read_csv(path, ("Filename", "Class")), start=2):
            value = row["Class"].strip()
            cls = ann.class_names.index(value) if value in ann.class_names else _int_or_none(value)
            if cls is None or not 0 <= cls < len(ann.class_names):
                raise CerberusError(f"{path} line {i}: class {value!r} is not one of {list(ann.class_names)}")
            out[row["Filename"]] = cls
        return out

    def image_mpps(self) -> dict[str, float]:
        """``{name: mpp}`` of the images listed in ``mpp_csv`` (empty without one); values are checked."""
        return dict(self._mpp_table)

    def image_mpp(self, name: str) -> float:
        """The resolution of one image: its row of ``mpp_csv``, else the dataset's ``mpp``."""
        return self._mpp_table.get(name, float(self.mpp))

    @functools.cached_property
    def _mpp_table(self) -> dict[str, float]:
        """``mpp_csv`` read once per spec."""
        if self.mpp_csv is None:
            return {}
        path = self.root / self.mpp_csv
        out = {}
        for i, row in enumerate(_read_csv(path, ("Filename", "Mpp")), start=2):
            try:
                value = float(row["Mpp"])
            except ValueError:
                value = float("nan")
            if not 0.01 <= value <= 100:
                raise CerberusError(f"{path} line {i}: Mpp must be microns per pixel (e.g. 0.25), got {row['Mpp']!r}")
            out[row["Filename"]] = value
        return out

    def read_image(self, name: str) -> np.ndarray:
        return read_rgb(self.image_path(name))

    def read_mask(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """Boolean tissue mask (all tissue when the dataset has no mask folder)."""
        path = self.mask_path(name)
        if path is None:
            return np.ones(shape, bool)
        if not path.is_file():
            raise CerberusError(f"{path}: tissue mask missing for image {name!r}")
        return _read_binary(path, shape, "mask")

    def read_region(self, name: str, shape: tuple[int, int]) -> np.ndarray | None:
        """Boolean mask of the labelled pixels of ``name`` (only these carry a loss in training), or None when the
        whole image is labelled (no region folder, or no region file for this image)."""
        path = self.region_path(name)
        if path is None or not path.is_file():
            return None
        return _read_binary(path, shape, "labelled region")

    def read_annotation(self, name: str, task: str, shape: tuple[int, int] | None = None) -> Annotation:
        """One image's labels, validated: shape equal to the image's, class ids within the declared classes."""
        ann = self.annotation(task)
        if ann.kinds == ("class",):
            classes = self.image_classes(task)
            if name not in classes:
                raise CerberusError(f"{self.root / ann.csv}: no class for image {name!r}")
            return Annotation(label=classes[name])
        path = self.label_path(name, task)
        return read_label_file(path, ann, shape)

    # ---- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "root"}
        d["annotations"] = []
        for a in self.annotations:
            ad = {k: v for k, v in dataclasses.asdict(a).items() if v is not None}
            ad["kinds"] = list(a.kinds)
            if a.class_names is not None:
                ad["class_names"] = list(a.class_names)
            if a.class_colors is not None:
                ad["class_colors"] = [list(c) for c in a.class_colors]
            d["annotations"].append(ad)
        return d

    def save(self) -> Path:
        """Write ``dataset.yaml`` into ``root`` (atomically)."""
        path = self.root / "dataset.yaml"
        atomic_write_bytes(path, yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None).encode())
        return path


def _read_binary(path: Path, shape: tuple[int, int], what: str) -> np.ndarray:
    """A grey image of ``shape`` as a boolean mask (> 0); a corrupt file or another shape is a one-line error."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise CerberusError(f"{path} is not a readable image (corrupt or not an image)")
    if mask.shape != shape:
        raise CerberusError(f"{path}: {what} shape {mask.shape} differs from its image {shape}")
    return mask > 0


def _annotation_from_dict(d) -> AnnotationSpec:
    if isinstance(d, dict) and isinstance(d.get("kinds"), list):
        d = {**d, "kinds": tuple(d["kinds"])}
    return from_dict(AnnotationSpec, d, "dataset.yaml annotation")


def _int_or_none(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise CerberusError(f"{path}: file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise CerberusError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
        return list(reader)


def load_dataset(path: str | Path) -> DatasetSpec:
    """Read and validate a ``dataset.yaml`` (or the folder holding one); errors name the key or path."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.yaml"
    if not path.is_file():
        raise CerberusError(f"{path}: dataset description not found")
    data = read_yaml_mapping(path)
    spec = from_dict(DatasetSpec, {**data, "root": path.parent}, f"{path}")
    for label, rel in [("image_dir", spec.image_dir), ("mask_dir", spec.mask_dir), ("region_dir", spec.region_dir)] + [
            (f"annotations[{a.task}].dir", a.dir) for a in spec.annotations]:
        if rel is not None and not (spec.root / rel).is_dir():
            raise CerberusError(f"{path} {label}: folder {spec.root / rel} not found")
    return spec


# ---- files ---------------------------------------------------------------------------------------------


def read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (H x W x 3); greyscale, RGBA and 16-bit images are converted."""
    if not path.is_file():
        raise CerberusError(f"{path}: image not found")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise CerberusError(f"{path} is not a readable image (corrupt or not an image)")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise CerberusError(f"{path}: unsupported pixel type {img.dtype}; save it as 8-bit RGB")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[..., :3]
    return np.ascontiguousarray(img[..., ::-1])


def write_rgb(path: Path, image: np.ndarray) -> None:
    """An RGB image in the format of the path's suffix, written atomically."""
    write_image(path, image)


def write_label(path: Path, annotation: Annotation) -> None:
    """Write an annotation as ``.npz`` (inst_map, id, class and/or class_map), atomically."""
    arrays = {}
    if annotation.inst_map is not None:
        arrays["inst_map"] = np.asarray(annotation.inst_map, np.int32)
        ids = np.asarray(annotation.ids if annotation.ids is not None else np.unique(arrays["inst_map"])[1:], np.int32)
        arrays["id"] = ids
        if annotation.classes is not None:
            arrays["class"] = np.asarray(annotation.classes, np.int32)
    if annotation.class_map is not None:
        arrays["class_map"] = np.asarray(annotation.class_map, np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_label_file(path: Path, ann: AnnotationSpec, shape: tuple[int, int] | None = None) -> Annotation:
    """Read a ``.npz`` or ``.mat`` label file and check it against the annotation spec and image shape."""
    if not path.is_file():
        raise CerberusError(f"{path}: annotation missing for its image")
    try:
        if path.suffix == ".mat":
            from scipy.io import loadmat

            raw = {k: v for k, v in loadmat(str(path)).items() if not k.startswith("__")}
        else:
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user error
        raise CerberusError(f"{path} is not a readable label file ({type(exc).__name__}); re-export it") from None
    inst = ids = classes = class_map = None
    if "inst" in ann.kinds:
        if "inst_map" not in raw:
            raise CerberusError(f"{path}: no 'inst_map' array")
        inst = np.asarray(raw["inst_map"]).astype(np.int32)
        present = np.unique(inst)
        present = present[present > 0]
        ids = np.asarray(raw["id"]).ravel().astype(np.int32) if "id" in raw else present
        if "type" in ann.kinds:
            if "class" not in raw:
                raise CerberusError(f"{path}: no 'class' array (one class per id) for the {ann.task} type labels")
            classes = np.asarray(raw["class"]).ravel().astype(np.int32)
            if classes.shape != ids.shape:
                raise CerberusError(f"{path}: {ids.size} ids but {classes.size} classes")
    if "class_map" in ann.kinds:
        if "class_map" not in raw:
            raise CerberusError(f"{path}: no 'class_map' array")
        class_map = np.asarray(raw["class_map"]).astype(np.int32)
    for label, arr in (("inst_map", inst), ("class_map", class_map)):
        if arr is None:
            continue
        if arr.ndim != 2:
            raise CerberusError(f"{path}: {label} must be 2-D, got shape {arr.shape}")
        if shape is not None and arr.shape != tuple(shape):
            raise CerberusError(f"{path}: {label} shape {arr.shape} differs from its image {tuple(shape)}")
    n = ann.num_classes
    for label, arr in (("class", classes), ("class_map", class_map)):
        if arr is not None and arr.size and (arr.min() < 0 or arr.max() >= n):
            raise CerberusError(f"{path}: {label} holds ids outside 0..{n - 1} ({', '.join(ann.class_names)})")
    return Annotation(inst_map=inst, ids=ids, classes=classes, class_map=class_map)


def write_splits(path: Path, splits: dict[str, int]) -> None:
    lines = ["Filename,Split"] + [f"{name},{split}" for name, split in sorted(splits.items())]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
