"""Importers for the public datasets: each converts a dataset in its released format into the common layout
(see :mod:`cerberus_histo.data.dataset`) with a split CSV and a ``dataset.yaml``.

``FORMATS`` maps a format name to ``(module, function, description)``; importers are imported lazily.
Each function is ``import_x(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True)
-> DatasetSpec``. Progress bars, here and in the other long commands, show on a terminal only
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
}


def import_dataset(fmt: str, src: str | Path, dst: str | Path, mpp: float | None = None, progress: bool = True):
    """Convert ``src`` (format ``fmt``) into the common layout at ``dst``; returns the DatasetSpec."""
    if fmt not in FORMATS:
        raise CerberusError(f"unknown dataset format {fmt!r}; formats: {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CerberusError(f"{src}: source folder not found")
    if dst.resolve() == src.resolve():
        raise CerberusError("the output folder must differ from the source folder")
    module, func, _ = FORMATS[fmt]
    importer = getattr(importlib.import_module(f"{__name__}.{module}"), func)
    return importer(src, dst, mpp=mpp, progress=progress)
