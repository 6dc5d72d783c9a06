"""Importers for the public datasets: each converts a dataset in its released format into the common layout
(see :mod:`cerberus_histo.data.dataset`) with a split CSV and a ``dataset.yaml``.

``FORMATS`` maps a format name to ``(module, function, description)``; importers are imported lazily.
Each function is ``import_x(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True)
-> DatasetSpec``; ``qupath`` (your own annotations) also takes the options of
:func:`~cerberus_histo.data.formats.qupath.qupath_import` (``maps``, ``roi_class``, ``whole_image``, ``tile_size``,
``model``), which the other formats refuse. Progress bars, here and in the other long commands, show on a terminal only
(tqdm ``disable=None``), so logs and captured stderr hold just the result or the one-line error. Class mappings are documented in each module and in ``docs/data.md``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ...errors import CerberusError

FORMATS: dict[str, tuple[str, str, str]] = {
    "glas": ("glas", "import_glas", "GlaS (Warwick-QU): BMP images, _anno instance maps, Grade.csv (glands)"),
    "crag": ("crag", "import_crag", "CRAG: images and instance-label PNGs (glands)"),
    "lizard": ("lizard", "import_lizard", "Lizard: images and .mat labels (nuclei, six classes)"),
    "conic": ("conic", "import_conic", "CoNIC: images.npy and labels.npy (nuclei, six classes)"),
    "pannuke": ("pannuke", "import_pannuke", "PanNuke: per-fold images.npy, masks.npy, types.npy (nuclei)"),
    "monuseg": ("monuseg", "import_monuseg", "MoNuSeg: TIFFs, XML polygons, per-image MicronsPerPixel (nuclei)"),
    "kather": ("kather", "import_kather", "Kather NCT-CRC-HE-100K or 2016 texture set: class folders (tissue patches)"),
    "qupath": ("qupath", "import_qupath", "your own annotations: images or slides with QuPath GeoJSON exports"),
}
#: the options only the qupath importer takes, with their command-line names
QUPATH_OPTIONS = {"maps": "--map", "roi_class": "--roi-class", "whole_image": "--whole-image",
                  "tile_size": "--tile-size", "model": "--model"}


def import_dataset(fmt: str, src: str | Path, dst: str | Path, mpp: float | None = None, progress: bool = True,
                   **options):
    """Convert ``src`` (format ``fmt``) into the common layout at ``dst``; returns the DatasetSpec. ``options``
    (:data:`QUPATH_OPTIONS`; None, False and () are not given) go to the qupath importer; another format
    given one is an error."""
    if fmt not in FORMATS:
        raise CerberusError(f"unknown dataset format {fmt!r}; formats: {', '.join(FORMATS)}")
    options = {k: v for k, v in options.items() if not (v is None or v is False or (isinstance(v, (list, tuple)) and not v))}
    unknown = sorted(set(options) - set(QUPATH_OPTIONS))
    if unknown:
        raise TypeError(f"import_dataset() got unknown options {unknown}")
    if options and fmt != "qupath":
        names = ", ".join(QUPATH_OPTIONS[k] for k in options)
        one = len(options) == 1
        raise CerberusError(f"{names} {'is' if one else 'are'} for the qupath format only, not for {fmt}; leave "
                            f"{'it' if one else 'them'} out")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CerberusError(f"{src}: source folder not found")
    if dst.resolve() == src.resolve():
        raise CerberusError("the output folder must differ from the source folder")
    module, func, _ = FORMATS[fmt]
    importer = getattr(importlib.import_module(f"{__name__}.{module}"), func)
    return importer(src, dst, mpp=mpp, progress=progress, **options)
