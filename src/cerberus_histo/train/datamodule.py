"""The data side of a training run: which folders feed which heads, folds, and the Lightning data module.

A *source* is one dataset folder and the heads it labels, for example the nuclei patches labelling
``nuclei-inst`` and ``nuclei-type``. A folder is either the output of ``cerberus extract-patches`` (``.npz``
files under ``split_k/`` folders) or a dataset folder (``dataset.yaml``), whose patches are then extracted
into the run folder first. With ``fold = k`` the samples of split ``k`` validate and the other splits train
(the original trained on one split only); a source without split ``k`` (while another has it) trains on all its
samples; ``fold = 0`` trains on everything and skips validation. Every source reaches the model at the model's
resolution (``ModelConfig.mpp``): dataset folders are extracted at it, and patch folders must have been (their
``patches.json`` says).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, default_collate

from ..config import ModelConfig
from ..errors import CerberusError
from .config import TrainConfig
from .data import PatchSet, TrainingSet, patch_files
from .sampling import TaskBatchSampler

_SPLIT = re.compile(r"^split_(\d+)$")


@dataclass(frozen=True)
class Source:
    """A dataset folder and the heads (``"gland-inst"``, ...) whose labels it provides."""

    folder: Path
    heads: tuple[str, ...]


def resolve_folder(source: Source, config: ModelConfig, work_dir: Path, progress: bool = True) -> tuple[Path, dict]:
    """``(patch folder, record)`` of a source: a dataset folder's patches are first extracted into ``work_dir``
    at the model's mpp; a patch folder must hold patches at the model's mpp. The record (folder, heads, the
    patches' ``mpp`` and the range of the images' own, ``dataset_mpp``) goes into ``train.yaml``."""
    from ..data.patches import META_FILE, extract_patches, read_meta
    from ..data.resolution import same_mpp

    folder = Path(source.folder)
    if not folder.is_dir():
        raise CerberusError(f"{folder}: data folder not found")
    record = {"folder": str(folder), "heads": list(source.heads), "mpp": config.mpp}
    if (folder / "dataset.yaml").is_file():
        from ..data.dataset import load_dataset

        spec = load_dataset(folder)
        size = config.patch_shape
        win = 2 * size + 100  # the original's 996 for 448: room for rotation and scaling before the centre crop
        report = extract_patches(folder, work_dir / "patches", win, size, "mirror", progress, mpp=config.mpp)
        if report.patches == 0 and report.skipped_images == 0:
            raise CerberusError(f"{folder}: no patches could be extracted (no labelled tissue?)")
        mpps = [spec.image_mpp(n) for n in spec.names()]
        record["dataset_mpp"] = [min(mpps), max(mpps)]
        return work_dir / "patches" / spec.name, record
    patch_files(folder)  # an empty folder is its own error
    metas = [(p.parent, read_meta(p.parent)) for p in sorted(folder.rglob("patches.json"))]
    if not metas:
        raise CerberusError(f"{folder}: no patches.json, so the patches' resolution is unknown; extract them with "
                            f"cerberus extract-patches --mpp {config.mpp:g}, or give the dataset folder")
    for where, meta in metas:
        if meta.get("complete") is False:  # an extraction that stopped (a full disk): earlier versions wrote no key
            raise CerberusError(f"{where}: the patch extraction did not finish; run the same cerberus extract-patches "
                                "command again (it resumes), then train")
        if not same_mpp(meta["mpp"], config.mpp):
            raise CerberusError(f"{where}: patches at {meta['mpp']:g} um/px but the model works at {config.mpp:g}; "
                                f"re-extract them with --mpp {config.mpp:g}, or give the dataset folder")
        if meta.get("win_size"):  # one patch set per folder: never two window sizes mixed
            sets = sorted({p.parent.name for p in where.rglob("*.npz")})
            if sets != [f"{meta['win_size']}_{meta['step_size']}"] and sets:
                raise CerberusError(f"{where} holds patch sets {', '.join(sets)} but its {META_FILE} describes "
                                    f"{meta['win_size']}_{meta['step_size']} only; remove the others or extract "
                                    "into a new --out")
    ranges = [m.get("image_mpp_range", [m["mpp"], m["mpp"]]) for _, m in metas]
    record["dataset_mpp"] = [min(r[0] for r in ranges), max(r[1] for r in ranges)]
    return folder, record


def splits_of(folder: Path) -> list[int]:
    return sorted({int(m.group(1)) for p in folder.rglob("split_*") if p.is_dir() and (m := _SPLIT.match(p.name))})


def fold_files(folder: Path, fold: int, strict: bool = True) -> tuple[list[Path], list[Path]]:
    """Training and validation patch files of ``folder`` for ``fold`` (see the module docstring). A folder
    without split ``fold`` is an error, or with ``strict=False`` trains on all its patches and validates none."""
    every = patch_files(folder)  # an empty folder is its own error
    if fold == 0:
        return every, []
    splits = splits_of(folder)
    if fold not in splits:
        if not strict:
            return every, []
        found = ", ".join(map(str, splits)) or "none"
        raise CerberusError(f"{folder}: --fold {fold} needs a split_{fold} folder (splits found: {found}); "
                            "use --fold 0 to train on all patches without validation")
    train_splits = [k for k in splits if k != fold]
    if not train_splits:
        raise CerberusError(f"{folder}: only split {fold} exists, nothing left to train on; use --fold 0")
    return patch_files(folder, train_splits), patch_files(folder, [fold])


def collate(samples: list[dict]) -> dict:
    return default_collate(samples)


class _ValSet:
    """A fixed subset of a validation :class:`PatchSet` (no augmentation, seed 0)."""

    def __init__(self, patches: PatchSet, indices: np.ndarray):
        self.patches, self.indices = patches, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.patches.sample(int(self.indices[i]), 0)


class CerberusData(L.LightningDataModule):
    """Training batches from :class:`TaskBatchSampler` (each rank its own stream, rank in the seed) and one
    validation loader per validation set (every rank validates the same samples)."""

    def __init__(self, sources: list[tuple[Source, list[Path], list[Path]]], config: ModelConfig,
                 train_config: TrainConfig, mix: bool = True):
        super().__init__()
        cfg = train_config
        seg, cls, val = [], None, []
        for source, train_files, val_files in sources:
            ps = PatchSet(train_files, source.heads, config, train=True, stain_jitter=cfg.stain_jitter)
            if ps.mode == "class":
                if cls is not None:
                    raise CerberusError("only one patch-classification dataset per run")
                cls = ps
            else:
                seg.append(ps)
            if val_files:
                vs = PatchSet(val_files, source.heads, config, train=False)
                n = min(max(1, round(len(vs) * cfg.val_fraction)), cfg.val_max_samples, len(vs))
                idx = np.sort(np.random.default_rng(cfg.seed).choice(len(vs), n, replace=False))
                val.append(_ValSet(vs, idx))
        self.train_set = TrainingSet(seg, cls)
        self.val_sets = val
        self.train_config, self.mix = cfg, mix
        self.sampler: TaskBatchSampler | None = None

    def _make_sampler(self, rank: int = 0, num_batches: int = 1) -> TaskBatchSampler:
        cfg = self.train_config
        return TaskBatchSampler(self.train_set.seg_sizes, self.train_set.class_size, cfg.batch_size,
                                cfg.class_batch, cfg.p_seg, self.mix, cfg.seed, rank, num_batches, with_seeds=True)

    def train_dataloader(self):
        trainer = self.trainer
        module = trainer.lightning_module
        self.sampler = self._make_sampler(trainer.global_rank, max(1, trainer.max_steps - trainer.global_step))
        if module.sampler_state is not None:
            try:
                self.sampler.load_state_dict(module.sampler_state)
            except (KeyError, ValueError) as exc:
                raise CerberusError(f"the checkpoint was made with other datasets ({exc}); resume with the "
                                    "same data flags") from None
        workers = self.train_config.num_workers
        return DataLoader(self.train_set, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
                          persistent_workers=workers > 0)

    def val_dataloader(self):
        cfg = self.train_config
        loaders = []
        for vs in self.val_sets:
            bs = cfg.class_batch if vs.patches.mode == "class" else cfg.batch_size
            loaders.append(DataLoader(vs, batch_size=bs, collate_fn=collate, num_workers=0))
        return loaders

    def calibration_batches(self, n: int):
        """``n`` batches for measuring batch-norm statistics: segmentation batches, or tissue-patch batches when
        there are no segmentation data; the same on every rank and at every call (seeded by the run's seed)."""
        cfg, seg = self.train_config, self.train_set.seg_sizes
        sampler = TaskBatchSampler(seg, 0 if seg else self.train_set.class_size, cfg.batch_size, cfg.class_batch,
                                   1.0, self.mix, cfg.seed + 1, 0, n, with_seeds=True)
        for keys in sampler:
            yield collate([self.train_set[k] for k in keys])

    def sampler_state(self, step: int) -> dict:
        """The sampler's state after ``step`` batches of this rank (replayed: loaders draw ahead)."""
        sampler = self.sampler or self._make_sampler(self.trainer.global_rank if self.trainer else 0)
        return sampler.state_at(step)
