"""What the viewer shows: the finished results of a folder (or one ``.db`` store), each an :class:`Item`.

RESULTS is a result folder (``infer-tile`` or ``infer-wsi`` ``--output``; a cohort folder holds many) or one of its
``{stem}.db`` stores. In a folder every ``{stem}.db`` with a completion marker ``done/{stem}.json`` is an item. An
item is a *slide* when ``{stem}_metadata.json`` lies beside its store (the slide is the file its ``"slide"`` key
names), else a *tile* result (the image is the marker's ``"input"``); ``--slide PATH`` replaces that path where
there is one item. Images open with ``openslide.open_slide`` (OpenSlide for slides, an ``ImageSlide`` for PNG,
JPEG or plain TIFF tiles) behind OpenSlide's ``DeepZoomGenerator``.

Everything is checked before a server starts, each problem a one-line :class:`CerberusError` saying what to do: a
missing RESULTS or one without a finished result, a store that is missing, not SQLite or without TIAToolbox's
tables, an image that is not found or cannot be opened, and an image whose level-0 size differs from the one the
result was made from. Stores are opened read-only, one connection per thread (SQLite's connections stay in their
thread).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..errors import CerberusError, ConfigError
from ..io.files import MARKER_DIR  # the one convention for finished work (docs/outputs.md)
from ..outputs.records import UNCLASSIFIED, UNTYPED, UNTYPED_COLOR, own_class
from ..outputs.store import AnnotationStore
from .render import OVERLAP, TILE_SIZE, tissue_raster

#: the tasks an item's info lists, in this order
TASKS = ("gland", "lumen", "nuclei", "tissue")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _locate(recorded: str, folder: Path) -> Path:
    """A recorded image path; a relative one (as the run was given it) is tried from here, from the result folder
    and from the folder above it (where the run most often started)."""
    path = Path(recorded)
    if path.is_absolute() or path.is_file():
        return path
    base = folder.resolve()
    return next((b / path for b in (base, base.parent) if (b / path).is_file()), path)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class Item:
    """One result: its store, its image (level 0 ``width`` x ``height`` px at ``mpp``) and the model's classes."""

    index: int
    name: str
    kind: str  # "slide" or "tile"
    store_path: Path
    image_path: Path
    mpp: float
    width: int
    height: int
    config: ModelConfig
    heads: tuple[str, ...]
    slide: object = field(repr=False)  # the openslide object
    summary_path: Path | None = None
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _summary: dict | None = field(default=None, repr=False)
    _counts: dict | None = field(default=None, repr=False)
    _counts_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        from openslide.deepzoom import DeepZoomGenerator

        self.deepzoom = DeepZoomGenerator(self.slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
        # ImageSlide (tiles) reads one PIL image: one read at a time; OpenSlide reads in parallel
        self.read_lock = threading.Lock() if self.kind == "tile" else None

    @property
    def id(self) -> str:
        return str(self.index)

    @property
    def counts(self) -> dict[str, dict[str | None, int]]:
        """Objects per task and class name (None: untyped), counted on first use (one pass over the store: a
        cohort's slides are not all counted before the server starts)."""
        with self._counts_lock:
            if self._counts is None:
                self._counts = self.store().class_counts()
            return self._counts

    def store(self) -> AnnotationStore:
        """This thread's read-only connection to the item's store."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = AnnotationStore(self.store_path, readonly=True)
        return store

    def image_tile(self, level: int, col: int, row: int):
        """The RGB PIL image of a Deep Zoom tile, of exactly the size ``get_tile_dimensions`` gives (OpenSlide's
        ``get_tile`` keeps the aspect ratio when it scales, and can come out one pixel short); ValueError outside
        the grid."""
        from PIL import Image

        dz = self.deepzoom
        args = dz.get_tile_coordinates(level, (col, row))
        size = dz.get_tile_dimensions(level, (col, row))
        if self.read_lock is not None:
            with self.read_lock:
                tile = self.slide.read_region(*args)
        else:
            tile = self.slide.read_region(*args)
        bg = Image.new("RGB", tile.size, "#" + self.slide.properties.get("openslide.background-color", "ffffff"))
        tile = Image.composite(tile, bg, tile)
        return tile if tile.size == tuple(size) else tile.resize(size, Image.Resampling.LANCZOS)

    # ---- what the API returns ------------------------------------------------------------------------------
    def brief(self) -> dict:
        return {"id": self.id, "name": self.name, "kind": self.kind, "width": self.width, "height": self.height,
                "mpp": self.mpp}

    def tasks(self) -> list[dict]:
        """Per task present (objects in the store, or a trusted head): its classes with colour and count. A task
        without a trusted type head lists one ``unclassified`` class in the neutral grey (its instances are
        untyped); class 0 appears only where objects have it."""
        out = []
        for name in TASKS:
            got = self.counts.get(name, {})
            head = f"{name}-class" if name == "tissue" else f"{name}-inst"
            try:
                spec = self.config.task(name)
            except ConfigError:
                continue
            if not got and head not in self.heads:
                continue
            typed = name == "tissue" or f"{name}-type" in self.heads or own_class(spec) != UNTYPED
            classes = []
            if typed:
                for c, cname in enumerate(spec.class_names):
                    if c or got.get(cname):
                        classes.append({"name": cname, "color": [int(v) for v in spec.class_colors[c]],
                                        "count": int(got.get(cname, 0))})
            listed = {c["name"] for c in classes}
            rest = sum(n for k, n in got.items() if k not in listed)
            if rest or not typed:
                classes.append({"name": UNCLASSIFIED, "color": list(UNTYPED_COLOR), "count": int(rest)})
            out.append({"task": name, "classes": classes})
        return out

    def summary(self) -> dict:
        """The run's summary: ``X_summary.json`` for a slide; for a tile built from its store (the summary its CSV
        holds, nuclei placed in the tissue regions of the store)."""
        with self._lock:
            if self._summary is None:
                doc = _read_json(self.summary_path) if self.summary_path is not None else None
                self._summary = doc if doc is not None else self._summarize()
            return self._summary

    def _summarize(self) -> dict:
        from ..outputs.summary import summarize

        store = self.store()
        raster, cell = tissue_raster(store, self.config, self.width, self.height)
        has_tissue = "tissue-class" in self.heads
        return summarize(store.records(self.config), self.config,
                         analysed_area_um2=float(self.width) * float(self.height) * self.mpp ** 2,
                         class_map=raster if has_tissue else None, cell=float(cell), heads=self.heads)

    def info(self) -> dict:
        return {**self.brief(), "dzi": f"/api/items/{self.id}/image.dzi", "tile_size": TILE_SIZE, "overlap": OVERLAP,
                "tasks": self.tasks(), "summary": self.summary()}


# ---- finding and checking results ------------------------------------------------------------------------
def find_items(results: Path, slide: Path | None = None) -> list[Item]:
    """The items of ``results`` (a result folder or one ``.db`` store), each checked (see the module docstring)."""
    results = Path(results)
    if not results.exists():
        raise CerberusError(f"{results} not found; pass a result folder (the --output of cerberus infer-tile or "
                            "infer-wsi) or one of its .db files")
    if results.is_file():
        if results.suffix.lower() != ".db":
            raise CerberusError(f"{results} is neither a result folder nor a .db store; pass the --output folder of "
                                "cerberus infer-tile or infer-wsi, or one of its .db files")
        folder, stems = results.parent, [results.stem]
    else:
        folder = results
        stems = sorted(p.stem for p in folder.glob("*.db")
                       if p.is_file() and (folder / MARKER_DIR / f"{p.stem}.json").is_file())
        if not stems:
            raise CerberusError(f"{results} holds no finished result (a {{stem}}.db store with its marker "
                                f"{MARKER_DIR}/{{stem}}.json); run cerberus infer-wsi, or infer-tile with the sqlite "
                                "format, into it first")
    if slide is not None and len(stems) > 1:
        raise CerberusError(f"--slide replaces the image of one result, but {results} holds {len(stems)}; pass one "
                            "of its .db files with --slide")
    items = []
    try:
        for i, stem in enumerate(stems):
            items.append(open_item(i, folder, stem, slide, many=len(stems) > 1))
    except BaseException:
        for item in items:
            item.slide.close()
        raise
    return items


def _open_store(db: Path) -> AnnotationStore:
    if not db.is_file():
        raise CerberusError(f"annotation store {db} not found; pass a result folder or a .db file a cerberus run "
                            "wrote")
    try:
        return AnnotationStore(db, readonly=True)
    except CerberusError as exc:
        why = "not an SQLite file" if "not a database" in str(exc) else "no TIAToolbox annotation tables"
        raise CerberusError(f"{db} is not an annotation store ({why}); pass a result folder or a .db file that "
                            "cerberus infer-tile or infer-wsi wrote") from None


def open_item(index: int, folder: Path, stem: str, slide: Path | None = None, many: bool = False) -> Item:
    """Open and check result ``stem`` of ``folder``; ``slide`` replaces its recorded image path."""
    db = folder / f"{stem}.db"
    marker = _read_json(folder / MARKER_DIR / f"{stem}.json")
    meta_path = folder / f"{stem}_metadata.json"
    meta = _read_json(meta_path) if meta_path.is_file() else None
    with _open_store(db) as store:
        try:
            store_meta = store.metadata
        except Exception as exc:  # a damaged file: sqlite3 errors are raised on reading
            raise CerberusError(f"cannot read the annotation store {db} ({_one_line(exc)}); run the inference "
                                "again") from None
    if meta is None and marker is None:
        raise CerberusError(f"{db} has neither its marker {MARKER_DIR}/{stem}.json nor {stem}_metadata.json beside "
                            "it: the run that wrote it did not finish; run it again")
    try:
        config = ModelConfig.from_dict(store_meta["model"])
    except (KeyError, TypeError, CerberusError) as exc:
        raise CerberusError(f"{db} holds no readable model configuration in its metadata ({_one_line(exc)}); view "
                            "a store written by cerberus infer-tile or infer-wsi") from None
    heads = tuple(store_meta.get("trusted_heads") or config.head_names)
    if meta is not None:
        kind, recorded = "slide", meta.get("slide")
        expected = meta.get("level0_dimensions") or store_meta.get("level0_dimensions")
        mpp = meta.get("mpp", store_meta.get("mpp"))
        summary_path = folder / f"{stem}_summary.json"
    else:
        kind, recorded = "tile", marker.get("input")
        shape = marker.get("image_shape")
        expected = [shape[1], shape[0]] if isinstance(shape, list) and len(shape) == 2 else None
        mpp = marker.get("image_mpp", store_meta.get("mpp"))
        summary_path = None
    how = "view its .db file with --slide PATH" if many else "pass --slide PATH"
    if slide is None and not recorded:
        raise CerberusError(f"result {stem} does not record its {kind}'s path; {how}")
    image = Path(slide) if slide is not None else _locate(str(recorded), folder)
    if not image.is_file():
        raise CerberusError(f"{kind} {image} of result {stem} not found; {how} to the {kind} it was made from")
    import openslide

    try:
        osr = openslide.open_slide(str(image))
    except Exception as exc:
        raise CerberusError(f"cannot open {image} as a slide or image ({_one_line(exc)}); {how} to the {kind} "
                            f"result {stem} was made from") from None
    width, height = (int(v) for v in osr.dimensions)
    if expected is not None and [width, height] != [int(v) for v in expected]:
        osr.close()
        raise CerberusError(f"{image} is {width} x {height} px but result {stem} was made from a {expected[0]} x "
                            f"{expected[1]} px {kind}; {how} to the {kind} it was made from")
    try:
        mpp = float(mpp)
        if not math.isfinite(mpp) or mpp <= 0:
            raise ValueError
    except (TypeError, ValueError):
        osr.close()
        raise CerberusError(f"result {stem} records no valid microns per pixel ({mpp!r}); run the inference "
                            "again") from None
    return Item(index, stem, kind, db, image, mpp, width, height, config, heads, osr,
                summary_path if summary_path is not None and summary_path.is_file() else None)


__all__ = ["MARKER_DIR", "OVERLAP", "TASKS", "TILE_SIZE", "Item", "find_items", "open_item"]
