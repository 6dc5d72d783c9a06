"""Training samples from extracted patches: augmentation, targets, and labels flags per head.

A :class:`PatchSet` is one dataset's patch files (``cerberus extract-patches`` output) labelling some heads
of the model. Every sample carries a target for *every* head of the model, with ``has/{head}`` False and
zeros where the dataset has no such labels, so samples of different datasets collate into one batch and
the masked losses ignore what is missing. Every sample also carries ``labelled`` (float32 H x W, 1 where the
pixel is labelled): the patch's own ``labelled`` map (images annotated only in part), augmented with the label
maps, or all ones; the dense losses count only its pixels. :class:`TrainingSet` joins the datasets in the
order the :class:`~cerberus_histo.train.sampling.TaskBatchSampler` indexes them and takes ``(index, seed)``
keys, so each draw of a patch gets its own augmentation, reproducibly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..data.augment import Augmenter
from ..data.patches import load_patch
from ..data.targets import fix_mirror_padding, instance_target, separation_weight
from ..errors import CerberusError

_LABELLED = "_labelled"  # the labelled region among the augmented maps (no head has this name)


def patch_files(folder: str | Path, splits: list[int] | None = None) -> list[Path]:
    """Patch files under an extract-patches folder (``.../split_k/...``), of some splits or all."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CerberusError(f"{folder}: patch folder not found")
    files = sorted(folder.rglob("*.npz"))
    if splits is not None:
        keep = {f"split_{k}" for k in splits}
        files = [f for f in files if keep & set(f.relative_to(folder).parts)]
    if not files:
        which = "" if splits is None else f" in split(s) {', '.join(map(str, splits))}"
        raise CerberusError(f"{folder}: no patch files (.npz){which}; run cerberus extract-patches first")
    return files


class PatchSet:
    """Patches of one dataset, labelling ``heads`` (a subset of the model's heads)."""

    def __init__(self, files: list[Path], heads: tuple[str, ...], config: ModelConfig, train: bool = True,
                 stain_jitter: bool = False):
        self.files, self.heads, self.config, self.train = list(files), tuple(heads), config, train
        kinds = {config.head(h)[1].kind for h in heads}
        if "class" in kinds and len(kinds) > 1:
            raise CerberusError("a dataset labels either patch classes or dense maps, not both")
        self.mode = "class" if kinds == {"class"} else "seg"
        shape = config.class_patch_shape if self.mode == "class" else config.patch_shape
        self.shape = shape
        self.augment = Augmenter(self.mode if train else "valid", shape, stain=stain_jitter)

    def __len__(self) -> int:
        return len(self.files)

    def _maps(self, patch: dict, path: Path) -> dict[str, np.ndarray]:
        maps = {}
        for name in self.heads:
            task, head = self.config.head(name)
            key = f"{task.name}_{'class' if head.kind == 'class' else head.kind}"
            if key not in patch:
                raise CerberusError(f"{path}: no {key!r} array for head {name}; was it extracted with those labels?")
            if head.kind != "class":
                maps[name] = patch[key]
        return maps

    def sample(self, index: int, seed: int = 0) -> dict[str, np.ndarray]:
        path = self.files[index]
        patch = load_patch(path)
        maps = self._maps(patch, path)
        if "labelled" in patch:  # the labelled region moves with the labels (nearest, as a mask)
            maps[_LABELLED] = patch["labelled"]
        image, maps = self.augment(patch["image"], maps, seed=seed)
        out: dict[str, np.ndarray] = {"image": np.ascontiguousarray(image.transpose(2, 0, 1))}
        hw = image.shape[:2]
        labelled = maps.pop(_LABELLED, None)
        out["labelled"] = np.ones(hw, np.float32) if labelled is None else (labelled > 0).astype(np.float32)
        for name in self.config.head_names:
            task, head = self.config.head(name)
            has = name in self.heads
            if head.kind == "class":
                label = int(patch[f"{task.name}_class"]) if has else 0
                out[f"target/{name}"] = np.int64(label)
            elif head.kind == "inst":
                if has:
                    inst = fix_mirror_padding(maps[name])
                    k = task.kernel_px(self.config.mpp)
                    label = instance_target(inst, k)
                    weight = separation_weight(label == 1, k) if self.train else np.ones(hw, np.float32)
                else:
                    label, weight = np.zeros(hw, np.uint8), np.ones(hw, np.float32)
                out[f"target/{name}"] = label.astype(np.int64)
                out[f"weight/{name}"] = weight
                if not self.train:  # the instances themselves, for validation PQ
                    out[f"inst/{name}"] = inst.astype(np.int32) if has else np.zeros(hw, np.int32)
            else:
                out[f"target/{name}"] = maps[name].astype(np.int64) if has else np.zeros(hw, np.int64)
            out[f"has/{name}"] = np.bool_(has)
        return out


class TrainingSet:
    """Segmentation sets then the classification set, indexed by ``(global index, augmentation seed)``."""

    def __init__(self, seg_sets: list[PatchSet], class_set: PatchSet | None = None):
        self.sets = list(seg_sets) + ([class_set] if class_set is not None else [])
        self.offsets = np.cumsum([0] + [len(s) for s in self.sets])

    @property
    def seg_sizes(self) -> list[int]:
        return [len(s) for s in self.sets if s.mode == "seg"]

    @property
    def class_size(self) -> int:
        return sum(len(s) for s in self.sets if s.mode == "class")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key) -> dict[str, np.ndarray]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        d = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.sets[d].sample(int(index - self.offsets[d]), int(seed))
