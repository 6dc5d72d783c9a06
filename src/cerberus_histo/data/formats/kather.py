"""Kather colorectal tissue patches by class: NCT-CRC-HE-100K (and CRC-VAL-HE-7K, Kather et al. 2019) or the
2016 texture set (Kather et al., Sci Rep 2016, ``Kather_texture_2016_image_tiles_5000``).

Source format: class folders directly under the source folder or one level deeper
(``src/NCT-CRC-HE-100K/ADI``, ``src/Kather_texture_2016_image_tiles_5000/01_TUMOR``), each holding image files
(``.tif``; ``.png`` and ``.jpg`` are accepted too). Folder names are matched case-insensitively; other folders
are ignored. The set is told by the folder names:

- NCT-CRC-HE-100K (2019): ``ADI BACK DEB LYM MUC MUS NORM STR TUM``, 224 x 224 px at 0.5 um/px (default mpp 0.5).
- 2016 texture set: ``01_TUMOR 02_STROMA 03_COMPLEX 04_LYMPHO 05_DEBRIS 06_MUCOSA 07_ADIPOSE 08_EMPTY``,
  150 x 150 px at 0.495 um/px (default mpp 0.495). The tiles are PackBits TIFFs with a 72-dpi resolution tag,
  which is not their pixel size and is ignored.

A source holding class folders of both sets (at either level) is an error: import each set on its own.

Classes (task ``tissue``: background, abnormal_epi, normal_epi, inflammatory, muscle, stroma, debris, mucous,
adipose; one class per patch, written to ``classes.csv``):

- 2019: ADI -> adipose, BACK -> background, DEB -> debris, LYM -> inflammatory, MUC -> mucous, MUS -> muscle,
  NORM -> normal_epi, STR -> stroma, TUM -> abnormal_epi.
- 2016: TUMOR -> abnormal_epi, STROMA -> stroma, COMPLEX -> stroma, LYMPHO -> inflammatory, DEBRIS -> debris,
  MUCOSA -> normal_epi, ADIPOSE -> adipose, EMPTY -> background. The 2016 set has no muscle or mucous class:
  its simple stroma includes smooth muscle and its debris class holds debris, necrosis, haemorrhage and mucus.
  "Complex stroma" is stroma holding single tumour cells and/or a few immune cells; it is mapped to stroma, its
  main tissue. To leave it out, remove (or rename) the ``03_COMPLEX`` folder before importing.

Samples are named ``<FOLDER>_<stem>`` (``01_TUMOR_1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151``). Splits:
within each class, round-robin over the sorted sample names into 3 splits.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ...errors import CerberusError
from ..dataset import AnnotationSpec, DatasetSpec, read_rgb
from .common import DatasetWriter, find_files

NUM_SPLITS = 3
CLASSES = {"ADI": "adipose", "BACK": "background", "DEB": "debris", "LYM": "inflammatory", "MUC": "mucous",
           "MUS": "muscle", "NORM": "normal_epi", "STR": "stroma", "TUM": "abnormal_epi"}
CLASSES_2016 = {"01_TUMOR": "abnormal_epi", "02_STROMA": "stroma", "03_COMPLEX": "stroma",
                "04_LYMPHO": "inflammatory", "05_DEBRIS": "debris", "06_MUCOSA": "normal_epi",
                "07_ADIPOSE": "adipose", "08_EMPTY": "background"}
DEFAULT_MPP = 0.5
DEFAULT_MPP_2016 = 0.495
# set key -> (name, folder -> class, default mpp, description)
SETS = {
    "2019": ("NCT-CRC-HE-100K", CLASSES, DEFAULT_MPP,
             "Kather NCT-CRC-HE tissue patches (224 px, 0.5 um/px); round-robin splits"),
    "2016": ("Kather 2016 texture", CLASSES_2016, DEFAULT_MPP_2016,
             "Kather 2016 colorectal texture tiles (150 px, 0.495 um/px; complex stroma as stroma); "
             "round-robin splits"),
}
IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def import_kather(src: Path, dst: Path, *, mpp: float | None = None, progress: bool = True) -> DatasetSpec:
    """Convert the Kather class folders under ``src`` (either set) into the common layout at ``dst``."""
    src = Path(src)
    key, folders = _class_folders(src)
    _, classes, default_mpp, description = SETS[key]
    jobs = []
    for folder in folders:
        cls = classes[folder.name.upper()]
        jobs += [(f"{folder.name}_{p.stem}", p, cls) for p in find_files(folder, IMAGE_EXTS)]
    if not jobs:
        raise CerberusError(f"{src}: the Kather class folders hold no images (*.tif)")
    jobs.sort()
    count: dict[str, int] = {}
    writer = DatasetWriter(dst, "kather", mpp=mpp if mpp is not None else default_mpp,
                           annotations=(AnnotationSpec("tissue", ("class",), csv="classes.csv"),),
                           num_splits=NUM_SPLITS, description=description)
    for name, path, cls in tqdm(jobs, desc="import kather", unit="patch", disable=None if progress else True):
        k = count[cls] = count.get(cls, -1) + 1
        writer.add(name, read_rgb(path), split=k % NUM_SPLITS + 1, image_class=cls)
    return writer.finish()


def _set_of(name: str) -> str | None:
    """Which set a folder name belongs to ("2019", "2016"), or ``None``."""
    upper = name.upper()
    return next((key for key, (_, classes, _, _) in SETS.items() if upper in classes), None)


def _class_folders(src: Path) -> tuple[str, list[Path]]:
    """``(set, folders)``: the class folders directly under ``src`` or, when there are none, one level deeper.
    Class folders of both sets, at either level, are an error."""
    top = sorted(d for d in src.iterdir() if d.is_dir())
    direct = [d for d in top if _set_of(d.name)]
    nested = [d for p in top if not _set_of(p.name) for d in sorted(p.iterdir()) if d.is_dir() and _set_of(d.name)]
    found: dict[str, Path] = {}
    for d in direct + nested:
        found.setdefault(_set_of(d.name), d)
    if len(found) > 1:
        a, b = found["2019"], found["2016"]
        raise CerberusError(f"{src} holds class folders of two Kather sets ({SETS['2019'][0]}: {a}; "
                            f"{SETS['2016'][0]}: {b}); import each set into its own dataset")
    folders = direct or nested
    if not folders:
        names = " ".join(CLASSES) + " or " + " ".join(CLASSES_2016)
        raise CerberusError(f"{src}: no Kather class folders found ({names})")
    return _set_of(folders[0].name), folders
