"""The Lightning module of a Cerberus training run: one step = one batch of one super-task.

A training step runs only the heads that have labels in the batch (so a decoder without data gets no
gradient), sums their masked losses (:mod:`.losses`), and logs each term. Tissue-patch batches are laid out as
mosaics labelled cell by cell (``class_mosaic``) and the head is applied densely, as at inference. Before each
validation and at the end, the batch-norm statistics are measured afresh (``bn_calibration_batches``). Validation accumulates
:class:`~.validation.ValidationStats` over every validation set and logs ``val/{head}/{metric}`` and
``val/score`` (the mean of PQ, type F1 and accuracy: the best checkpoint is chosen by it).

Stage-2 fine-tuning (``trainable`` given): every parameter outside the named heads is frozen and those
modules stay in eval mode, so their batch-norm statistics do not move either.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from ..models.net import CerberusNet
from .config import TrainConfig
from .losses import multitask_loss
from .validation import ValidationStats


def class_mosaic(batch: dict, heads: list[str], n: int, cell: int) -> dict:
    """A batch of tissue patches as ``n x n`` mosaics: patches ``k * n * n ... (k + 1) * n * n - 1`` side by side in
    row order (the last mosaic filled up with the batch's first patches), and for each head a per-cell target: the
    class of the patch under the centre of each ``cell``-px cell. The head is then applied densely, as inference
    applies it (:meth:`~cerberus_histo.models.net.CerberusNet.forward_dense`)."""
    images = batch["image"]
    count, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    mosaics = -(-count // (n * n))
    order = torch.arange(mosaics * n * n, device=images.device) % count
    side = n * size
    out = {"image": images[order].view(mosaics, n, n, channels, size, size).permute(0, 3, 1, 4, 2, 5)
           .reshape(mosaics, channels, side, side)}
    centres = torch.clamp(torch.arange(-(-side // cell), device=images.device) * cell + cell // 2, max=side - 1) // size
    for h in heads:
        grid = batch[f"target/{h}"][order].view(mosaics, n, n)
        out[f"target/{h}"] = grid[:, centres[:, None], centres[None, :]]
        out[f"has/{h}"] = batch[f"has/{h}"][order].view(mosaics, n * n).all(1)
    return out


def patch_heads(model: CerberusNet, batch: dict) -> list[str]:
    """The patch-class heads that every sample of ``batch`` labels: not empty for a batch of tissue patches."""
    return [h for h in model.head_names
            if model.config.head(h)[1].kind == "class" and f"has/{h}" in batch and bool(batch[f"has/{h}"].all())]


def calibrate_batchnorm(model: CerberusNet, batches, mosaic: int = 1, device="cpu") -> list[torch.nn.Module]:
    """Measure the batch-norm statistics of ``model`` afresh on ``batches`` (training batches: dicts with ``image``;
    tissue-patch batches are laid out as ``mosaic x mosaic`` mosaics first), every head run densely as inference
    runs it, as cumulative means rather than running ones; returns the batch-norm layers. Training's running
    averages follow the last few dozen batches, segmentation or tissue patches alike: at the end of the demo's
    training they cost up to 0.44 patch accuracy and 0.2 lumen PQ (docs/inference.md). Weights are untouched."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    training = model.training
    model.train()
    cell = int(model.encoder.strides[-1])
    try:
        with torch.inference_mode(False), torch.no_grad():
            for batch in batches:
                if mosaic > 1 and (heads := patch_heads(model, batch)):
                    batch = class_mosaic(batch, heads, mosaic, cell)
                model.forward_dense(batch["image"].to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(training)
    return norms


class CerberusModule(L.LightningModule):
    def __init__(self, model: CerberusNet, train_config: TrainConfig, trainable: tuple[str, ...] | None = None):
        super().__init__()
        self.model = model
        self.train_config = train_config
        self.trainable = trainable
        if trainable:
            for name, p in model.named_parameters():
                p.requires_grad_(any(name.startswith(f"heads.{h}.") for h in trainable))
        self.stats = ValidationStats(model.config)
        self.last_validation: dict[str, float] = {}
        self.validated_at: int | None = None  # global step of the last validation
        self.calibrated_at: int | None = None  # global step of the last batch-norm calibration
        self.sampler_state: dict | None = None  # read from a checkpoint on resume
        self.samples_seen = 0  # on this rank, in this process
        self.ranks_agree: bool | None = None

    def _freeze_modes(self) -> None:
        """Frozen parts in eval mode, so their batch-norm statistics do not move (Lightning sets modes
        itself around validation, hence at every step)."""
        self.model.eval()
        for h in self.trainable:
            self.model.heads[h].train()

    # ---- steps --------------------------------------------------------------------------------------
    def _heads(self, batch: dict) -> list[str]:
        heads = [h for h in self.model.head_names if bool(batch[f"has/{h}"].any())]
        return [h for h in heads if h in self.trainable] if self.trainable else heads

    def training_step(self, batch: dict, batch_idx: int):
        # dropout draws from a generator seeded by (seed, step, rank): a resumed run repeats them exactly
        torch.manual_seed(int(np.random.SeedSequence([self.train_config.seed, self.global_step, self.global_rank])
                              .generate_state(1)[0]))
        if self.trainable:
            self._freeze_modes()
        heads = self._heads(batch)
        if not heads:  # a batch without any label of a trained head: nothing to learn (and no all-reduce)
            raise RuntimeError("a training batch carries no labels of the trained heads")
        n = len(batch["image"])  # samples (patches, not mosaics)
        dense = False
        if self.train_config.class_mosaic > 1 and patch_heads(self.model, batch):
            batch = class_mosaic(batch, heads, self.train_config.class_mosaic, int(self.model.encoder.strides[-1]))
            dense = True
        logits = self.model(batch["image"], heads=heads, dense=dense)
        loss, parts = multitask_loss(self.model.config, logits, batch)
        self.samples_seen += n
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, batch_size=n)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.calibrate_batchnorm()
        self.stats.reset()

    def calibrate_batchnorm(self) -> None:
        """:func:`calibrate_batchnorm` on ``bn_calibration_batches`` training batches (the same at every call),
        skipped when fine-tuning (frozen statistics) and when already done at this step; rank 0's statistics are
        then given to every rank."""
        n = self.train_config.bn_calibration_batches
        dm = self.trainer.datamodule if self._trainer is not None else None
        if not n or self.trainable or dm is None or self.calibrated_at == self.global_step:
            return
        norms = calibrate_batchnorm(self.model, dm.calibration_batches(n), self.train_config.class_mosaic, self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for m in norms:
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    torch.distributed.broadcast(buf, 0)
        self.calibrated_at = self.global_step

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        heads = [h for h in self.model.head_names if bool(batch[f"has/{h}"].any())]
        if not heads:
            return
        logits = self.model(batch["image"], heads=heads)
        probs = {h: v.float().softmax(1).cpu().numpy() for h, v in logits.items()}
        self.stats.update(probs, {k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in batch.items()})

    def on_validation_epoch_end(self) -> None:
        summary = self.stats.summary()
        self.last_validation, self.validated_at = summary, self.global_step
        # every rank validates the same samples, so the values agree without a reduction
        self.log_dict({f"val/{k}": float(v) for k, v in summary.items() if np.isfinite(v) and k != "score"})
        self.log("val/score", summary["score"], prog_bar=True)

    def on_train_end(self) -> None:
        """Calibrate the batch-norm statistics (:meth:`calibrate_batchnorm`), then check that every rank ends with
        the same weights (parameter and buffer checksums gathered)."""
        self.calibrate_batchnorm()
        with torch.no_grad():
            vec = torch.stack([v.detach().double().sum() for v in self.model.state_dict().values()
                               if v.is_floating_point()])
            gathered = self.all_gather(vec)
        if gathered.ndim > vec.ndim:
            self.ranks_agree = bool(torch.equal(gathered.min(0).values, gathered.max(0).values))
        else:
            self.ranks_agree = True

    # ---- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.train_config
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optimizer
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
            opt = cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        s = cfg.scheduler
        if s.name == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
        elif s.name == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_steps)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ---- exact resume: the batch sampler's position --------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        dm = self.trainer.datamodule
        if dm is not None:
            checkpoint["cerberus"] = {"sampler": dm.sampler_state(self.trainer.global_step),
                                      "model_config": self.model.config.to_dict(),
                                      "train_config": self.train_config.to_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.sampler_state = checkpoint.get("cerberus", {}).get("sampler")
