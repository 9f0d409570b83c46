"""The Lightning pieces of training: loss, optimiser and schedule around a network, and a callback.

* :class:`LesionModule`: end-to-end training of a ``LesionNet`` (the paper's recipe; ``train.py``).
* :class:`StageModule`: one stage of the ``lpft`` recipe on cached inputs (``lpft.py``).
* :class:`KeepBest`: remembers the weights of the epoch with the lowest inner-validation loss.

The networks themselves live in ``model.py``; this module imports Lightning, so ``train.py`` and
``lpft.py`` import it inside the functions that train.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from liverlesion.config import Config
from liverlesion.errors import UserError


def _weights_buffer(module: nn.Module, class_weights) -> None:
    module.register_buffer(
        "class_weights", None if class_weights is None else torch.as_tensor(class_weights).float()
    )


class _SelectionLoss(pl.LightningModule):
    """Logs ``val_loss``, what early stopping and the kept weights compare epochs by, once per epoch.

    It is :func:`selection_loss` over the whole inner-validation set (gathered from every process
    under DDP), because a temperature is fitted on all of it.
    """

    def on_validation_epoch_start(self):
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _collect(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self._val.append((logits.detach().float(), y.detach()))

    def on_validation_epoch_end(self):
        if not self._val:
            return
        logits = torch.cat([v[0] for v in self._val])
        y = torch.cat([v[1] for v in self._val])
        if self.trainer.world_size > 1:  # DistributedSampler pads every process to the same length
            logits = self.all_gather(logits).reshape(-1, logits.shape[-1])
            y = self.all_gather(y).reshape(-1)
        w = None if self.class_weights is None else self.class_weights.cpu()
        self.log("val_loss", selection_loss(logits.cpu(), y.cpu(), w, self.cfg), prog_bar=True)


class LesionModule(_SelectionLoss):
    """Loss, optimiser and schedule around a ``LesionNet`` trained end to end."""

    def __init__(self, model: nn.Module, cfg: Config, class_weights=None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        _weights_buffer(self, class_weights)

    def forward(self, x):
        # the network half: a fusion model's radiomics branch is fitted after training (train.finish_fold)
        return self.model.network_logits(x)

    def on_train_batch_start(self, batch, batch_idx):
        # Small batches of a few hundred lesions make BatchNorm's running statistics noisy
        # (validation loss then jumps between epochs); keeping the pretrained statistics fixed
        # is the usual remedy when fine-tuning on small data. Lightning restores each submodule's
        # train/eval flag itself, so this is set per batch rather than by overriding train().
        if self.cfg.model.freeze_bn and self.cfg.model.weights != "none":
            for m in self.model.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _loss(self, logits, y):
        return F.cross_entropy(
            logits, y, weight=self.class_weights, label_smoothing=self.cfg.train.label_smoothing
        )

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = self._loss(self(x), y)
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True
        )
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        self._collect(logits, y)
        loss = self._loss(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("val_raw_loss", loss, batch_size=len(y), sync_dist=True)
        self.log("val_acc", acc, prog_bar=True, batch_size=len(y), sync_dist=True)

    def on_train_epoch_start(self):
        # Augmentation and dropout draw from (seed, epoch) alone, so resuming from last.ckpt at
        # epoch N continues exactly as an uninterrupted run (with train.num_workers=0).
        torch.manual_seed(self.cfg.train.seed * 100_003 + self.current_epoch)
        # Optionally keep the pretrained backbone frozen for the first epochs (head warm-up).
        frozen = self.current_epoch < self.cfg.model.freeze_backbone_epochs
        for p in self.model.backbone_parameters():
            p.requires_grad_(not frozen)

    def configure_optimizers(self):
        t = self.cfg.train
        head = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.")]
        back = list(self.model.backbone_parameters())
        groups = [{"params": back, "lr": t.lr * t.backbone_lr_mult}, {"params": head, "lr": t.lr}]
        if t.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, weight_decay=t.weight_decay, foreach=True)
        elif t.optimizer == "sgd":
            opt = torch.optim.SGD(
                groups, momentum=0.9, nesterov=True, weight_decay=t.weight_decay, foreach=True
            )
        else:
            raise UserError(f"config train.optimizer={t.optimizer!r}: choose adamw or sgd")
        if t.scheduler == "none":
            return opt
        if t.scheduler != "cosine":
            raise UserError(f"config train.scheduler={t.scheduler!r}: choose cosine or none")
        warm, total = t.warmup_epochs, max(t.epochs, 1)

        def factor(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / (warm + 1)
            progress = (epoch - warm) / max(total - warm, 1)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def selection_loss(logits: torch.Tensor, y: torch.Tensor, class_weights, cfg: Config) -> float:
    """The inner-validation loss that early stopping and :class:`KeepBest` compare epochs by.

    ``train.select_on=calibrated``: the cross-entropy after the temperature that the fold fits on
    the same lesions afterwards (:func:`~liverlesion.inference.fit_temperature`), so an epoch is
    judged by how well it ranks and separates the lesions, not by how over-confident it has become
    (which the temperature undoes). ``loss``: the raw cross-entropy.
    """
    logits = logits.detach().float()
    if cfg.train.select_on == "calibrated":
        from liverlesion.inference import fit_temperature

        logits = logits / fit_temperature(logits.numpy(), y.numpy())
    w = None if class_weights is None else torch.as_tensor(class_weights).float()
    return float(F.cross_entropy(logits, y, weight=w, label_smoothing=cfg.train.label_smoothing))


class StageModule(_SelectionLoss):
    """One ``lpft`` stage: ``net`` on cached inputs; validation averages each lesion's view logits."""

    def __init__(self, net: nn.Module, params, lr: float, cfg: Config, class_weights=None):
        super().__init__()
        self.net = net
        self.params, self.lr, self.cfg = params, lr, cfg
        _weights_buffer(self, class_weights)

    def _loss(self, logits, y):
        return F.cross_entropy(
            logits, y, weight=self.class_weights, label_smoothing=self.cfg.train.label_smoothing
        )

    def training_step(self, batch, _):
        x, y = batch
        loss = self._loss(self.net(x), y)
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True
        )
        return loss

    def validation_step(self, batch, _):
        x, y = batch  # (B, V, ...) -> mean logits over the views, as at prediction
        b, v = x.shape[:2]
        logits = self.net(x.reshape(b * v, *x.shape[2:])).reshape(b, v, -1).mean(1)
        self._collect(logits, y)
        self.log("val_raw_loss", self._loss(logits, y), batch_size=len(y), sync_dist=True)
        self.log(
            "val_acc",
            (logits.argmax(1) == y).float().mean(),
            prog_bar=True,
            batch_size=len(y),
            sync_dist=True,
        )

    def configure_optimizers(self):
        # foreach: one update over all tensors (PyTorch's default on GPU only); same numbers, and on
        # CPU 1.0-2.0x the steps/s of the small head (noisy: benchmarks/bench_lpft_speed.py)
        return torch.optim.AdamW(
            self.params, lr=self.lr, weight_decay=self.cfg.train.weight_decay, foreach=True
        )


class KeepBest(Callback):
    """Remember the weights of the epoch with the lowest inner-validation loss (below ``best``)."""

    def __init__(self, net: nn.Module, best: float, state: dict | None):
        self.net, self.best, self.state, self.improved = net, best, state, False
        self.best_epochs = 0  # epochs trained when the kept weights were reached

    def on_validation_end(self, trainer, pl_module):
        v = trainer.callback_metrics.get("val_loss")
        if v is not None and float(v) < self.best - 1e-6:
            self.best, self.improved = float(v), True
            self.best_epochs = int(trainer.current_epoch) + 1
            self.state = copy.deepcopy(self.net.state_dict())
