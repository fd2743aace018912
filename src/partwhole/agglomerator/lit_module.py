"""Loss, metrics, optimiser and logging around :class:`~partwhole.agglomerator.model.Agglomerator`.

One ``shared_step`` serves train / val / test for the three objectives:

* ``sam_distill`` — pretraining: a level-weighted loss (``--distill_loss``: MSE, the reference's, smooth L1
  or cosine) to the stage-2 SAM-mask embeddings (normalised and optionally PCA-reduced by
  :class:`~partwhole.agglomerator.targets.TargetSpace`); every stage also logs ``distill_r2``, how much of the
  targets the student predicts beyond their train-set mean;
* ``supcon`` — pretraining: supervised contrastive loss on two crops (baseline);
* ``classify`` — fine-tuning: cross-entropy of the classification head on the top
  level; the backbone is frozen (no grad, BatchNorm statistics fixed) unless
  ``finetune_backbone``.

Each objective trains only what its loss reads (:data:`OBJECTIVE_HEADS`): the other objectives' heads
stay in the model, under the reference's names, but frozen, as DDP needs every trainable parameter to
get a gradient in every step.

``save_hyperparameters()`` makes every checkpoint loadable without flags:
``AgglomeratorLitModule.load_from_checkpoint(path)``.

Every step returns ``{"loss", "levels"}`` (the final levels ``(b, n, l, d)``,
detached): callbacks such as :class:`~partwhole.agglomerator.islands_callback.IslandsCallback`
draw and score the islands from them in their ``on_*_batch_end`` hooks.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from partwhole.agglomerator.model import HEAD_PREFIXES, Agglomerator, AgglomeratorConfig
from partwhole.agglomerator.objectives import (
    DEFAULT_LEVEL_WEIGHTS,
    DISTILL_LOSSES,
    levels_distill_loss,
    supcon_loss,
)
from partwhole.agglomerator.targets import DistillR2, TargetSpace

log = logging.getLogger(__name__)

OBJECTIVES = ("sam_distill", "supcon", "classify")
OPTIMIZERS = ("lion", "adamw")
# The optional parts of the model each objective's loss reads; the others get no gradient from it.
OBJECTIVE_HEADS = {"sam_distill": "levels_encoder.", "supcon": "contrastive_head.",
                   "classify": "classification_head_from_last_level."}


class AgglomeratorLitModule(pl.LightningModule):
    def __init__(
        self,
        model: dict,
        objective: str = "sam_distill",
        learning_rate: float = 3e-4,
        weight_decay: float = 0.05,
        optimizer: str = "lion",
        lion_betas: Sequence[float] = (0.95, 0.98),
        scheduler: str = "onecycle",
        level_weights: Sequence[float] = DEFAULT_LEVEL_WEIGHTS,
        temperature: float = 0.07,
        finetune_backbone: bool = False,
        plot_islands: bool = False,
        plot_every: int = 50,
        teacher_norm: str = "none",
        embed_dim: int | None = None,
        target_dim: int | None = None,
        distill_loss: str = "mse",
    ):
        """``embed_dim``: the teacher's D (default: what the model outputs); ``target_dim``: regress the
        ``target_dim`` leading principal axes of the normalised targets instead of all D
        (:class:`~partwhole.agglomerator.targets.TargetSpace`; the model must then output ``target_dim``).
        ``distill_loss``: ``mse``, ``smooth_l1`` or ``cosine`` (:func:`~partwhole.agglomerator.objectives.levels_distill_loss`);
        ``distill_r2`` is always scored in squared error, whichever loss trains.
        ``plot_islands`` and ``plot_every`` are ignored (and no longer saved): checkpoints written before
        the islands moved to :class:`~partwhole.agglomerator.islands_callback.IslandsCallback` carry them."""
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: choose one of {OBJECTIVES}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer={optimizer!r}: choose one of {OPTIMIZERS}")
        if distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"--distill_loss={distill_loss!r}: choose one of {', '.join(DISTILL_LOSSES)}")
        self.save_hyperparameters(ignore=["plot_islands", "plot_every"])
        config = AgglomeratorConfig(**{**model, "contrastive_head": model.get("contrastive_head", False) or objective == "supcon"})
        self.model = Agglomerator(config)
        self.objective = objective
        self.level_weights = tuple(level_weights)
        if objective == "sam_distill" and len(self.level_weights) != config.levels:
            raise ValueError(f"--level_weights has {len(self.level_weights)} values for --levels={config.levels}")
        self.frozen_backbone = objective == "classify" and not finetune_backbone
        if self.frozen_backbone:
            for p in self.model.backbone_parameters():
                p.requires_grad_(False)
        # The heads of the other objectives are kept (checkpoints keep the reference's names) but frozen: under DDP
        # every parameter that requires a gradient must get one in every step.
        for name, p in self.model.named_parameters():
            if name.startswith(tuple(OBJECTIVE_HEADS.values())) and not name.startswith(OBJECTIVE_HEADS[objective]):
                p.requires_grad_(False)
        if objective == "classify":
            self.accuracy = torch.nn.ModuleDict(
                {f"{stage}_acc": MulticlassAccuracy(num_classes=config.n_classes, average="micro") for stage in ("train", "val", "test")}
            )
        if objective == "sam_distill":
            # Fitted by fit_targets() before training; its buffers are saved in checkpoints (outside model.*).
            self.targets = TargetSpace(embed_dim or self.model.embed_dim, config.num_patches, config.levels,
                                       norm=teacher_norm, target_dim=target_dim)
            if self.targets.out_dim != self.model.embed_dim:
                raise ValueError(f"the model outputs {self.model.embed_dim} dimensions per level but the targets have "
                                 f"{self.targets.out_dim}: set --levels_encoder_dim={self.targets.out_dim} (with --levels_encoder)"
                                 + (" or --target_dim to the model's output" if target_dim else ""))
            self.targets_fitted = True  # False for a checkpoint written before the mean predictor was kept
            self.r2 = nn.ModuleDict({f"{stage}_r2": DistillR2(config.levels, self.level_weights) for stage in ("train", "val", "test")})
        self.eval_loss = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})  # states not saved
        self._register_load_state_dict_pre_hook(self._upgrade_state_dict)

    def _upgrade_state_dict(self, state_dict, prefix, *args) -> None:
        """Checkpoints of earlier versions: ``teacher_mean``/``teacher_std`` are now ``targets.mean``/``.std``;
        without ``targets.column_mean`` (or with no normalisation saved) the missing statistics keep their
        neutral values and ``distill_r2`` is not logged."""
        for old, new in (("teacher_mean", "targets.mean"), ("teacher_std", "targets.std")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if not hasattr(self, "targets"):
            return
        for name, buffer in self.targets.named_buffers():
            if prefix + "targets." + name not in state_dict:
                state_dict[prefix + "targets." + name] = buffer.clone()
                if name == "column_mean":
                    self.targets_fitted = False

    # ------------------------------------------------------------------ forward / steps

    def fit_targets(self, embeds) -> None:
        """Fit the targets' normalisation, mean predictor and reduction on train embeddings ``(N, n, l, D)``."""
        self.targets.fit(embeds)
        self.targets_fitted = True

    def train(self, mode: bool = True):
        """Keep a frozen backbone in eval mode (its BatchNorm statistics stay the pretrained ones)."""
        super().train(mode)
        if self.frozen_backbone:
            self.model.image_to_tokens.eval()
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores each submodule's own train/eval mode around validation: enforce it per batch.
        if self.frozen_backbone:
            self.model.image_to_tokens.eval()

    def forward(self, image: torch.Tensor):
        return self.model(image)

    def shared_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        """Loss and logging of one batch; returns ``{"loss": loss, "levels": (b, n, l, d) detached}``
        (for two crops ``b`` counts each crop: image ``j``'s crops are rows ``2j`` and ``2j+1``)."""
        image, label = batch["image"], batch["label"]
        two_crops = image.ndim == 5
        flat = image.flatten(0, 1) if two_crops else image
        grad = nullcontext() if not self.frozen_backbone else torch.no_grad()
        with grad:
            out = self.model(flat)
        batch_size = image.shape[0]
        if self.objective == "sam_distill":
            targets = batch["targets"] if "targets" in batch else self.targets(batch["embeds"])
            loss = levels_distill_loss(out.encoded, targets, self.level_weights, self.hparams.distill_loss)
            if self.targets_fitted:  # train: the epoch's batches as the weights change (overfitting shows as train >> val)
                constants = batch["target_constants"] if "target_constants" in batch else self.targets.constants(batch["embeds"])
                self.r2[f"{stage}_r2"].update(self.targets.errors(out.encoded, targets, constants))
        elif self.objective == "supcon":
            feats = self.model.project(out.top_level)
            feats = feats.view(batch_size, 2, -1) if two_crops else feats.unsqueeze(1)
            loss = supcon_loss(feats, label, temperature=self.hparams.temperature)
        else:
            logits = self.model.classify(out.top_level)
            loss = F.cross_entropy(logits, label)
            metric = self.accuracy[f"{stage}_acc"]
            metric(logits, label)
            self.log(f"{stage}/accuracy", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size)
        if stage == "train":  # DDP: the shards are of equal size (Lightning's sampler pads them); sync_dist averages
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        else:  # a metric whose sums are reduced over the processes: Lightning's sync_dist miscounts unequal shards
            self.eval_loss[stage].update(loss.detach(), weight=batch_size)
            self.log(f"{stage}/loss", self.eval_loss[stage], prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size)
        return {"loss": loss, "levels": out.levels.detach()}

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        outputs = self.shared_step(batch, "train")
        m = self.model
        self.log_dict({"weights/wl": m.wl, "weights/wBU": m.wBU, "weights/wTD": m.wTD, "weights/wA": m.wA},
                      on_step=True, on_epoch=False)
        return outputs

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.shared_step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_r2("train")

    def on_validation_epoch_end(self) -> None:
        self._log_r2("val")

    def on_test_epoch_end(self) -> None:
        self._log_r2("test")

    def _log_r2(self, stage: str) -> None:
        """``<stage>/distill_r2`` (level-weighted, in the progress bar), ``<stage>/image_mean_r2`` and per level."""
        if self.objective != "sam_distill" or not self.targets_fitted:
            return
        metric = self.r2[f"{stage}_r2"]
        if not metric.update_count:
            return
        values = metric.compute()  # its sums are reduced over the processes first: every process holds the same
        metric.reset()
        self.log(f"{stage}/distill_r2", values.pop("distill_r2"), prog_bar=True, sync_dist=True)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Top-level features ``(b, n, d)`` and labels: what ``--mode freeze`` writes."""
        out = self.model(batch["image"])
        return {"features": out.top_level.float().cpu(), "labels": batch["label"].cpu()}

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # What earlier versions optimised: everything but a frozen backbone. The other objectives' heads are in it
        # though frozen (no gradient: the optimiser leaves them as they are), so their checkpoints still resume.
        backbone = {id(p) for p in self.model.backbone_parameters()} if self.frozen_backbone else set()
        params = [p for p in self.parameters() if id(p) not in backbone]
        if hp.optimizer == "lion":
            from timm.optim import Lion

            optimizer = Lion(params, lr=hp.learning_rate, betas=tuple(hp.lion_betas), weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        if hp.scheduler == "constant":
            return optimizer
        self.total_steps = max(int(self.trainer.estimated_stepping_batches), 2)
        # A plain function (not OneCycleLR's saved total) so that a resumed run with more epochs stretches the schedule.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: one_cycle_factor(step, self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def one_cycle_factor(step: int, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                     final_div_factor: float = 1e4) -> float:
    """Learning-rate multiplier of a one-cycle schedule (OneCycleLR's defaults, cosine phases).

    Warm up from ``1/div_factor`` to 1 over ``pct_start`` of the steps, then anneal
    to ``1/(div_factor*final_div_factor)``; past ``total_steps`` it stays there.
    """
    start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    warm = max(1, int(pct_start * total_steps))
    if step < warm:
        t, low, high = step / warm, start, 1.0
    else:
        t, low, high = min(1.0, (step - warm) / max(1, total_steps - warm)), 1.0, end
    return high + (low - high) * (1 + math.cos(math.pi * t)) / 2


def load_backbone_weights(module: AgglomeratorLitModule, checkpoint_path: str | Path) -> dict[str, list[str]]:
    """Load weights from one of our checkpoints or a reference one (``state_dict`` without hyper-parameters).

    Keys may carry our ``model.`` prefix or none (reference). Heads absent from
    the checkpoint keep their fresh initialisation (pretrain -> fine-tune);
    anything else missing, or any shape mismatch, is an error naming the file.
    Returns ``{"missing": [...], "unexpected": [...]}`` (heads only).
    """
    from partwhole.agglomerator.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(checkpoint_path)
    state = checkpoint.get("state_dict", checkpoint)
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    own = module.model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{checkpoint_path}: weights do not fit this model ({'; '.join(mismatched[:3])}); "
                         f"use the flags the checkpoint was trained with")
    result = module.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIXES)]
    if missing:
        raise ValueError(f"{checkpoint_path}: checkpoint lacks backbone weights ({', '.join(missing[:3])}...)")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        log.info("ignored %d checkpoint entries not in this model (e.g. %s)", len(unexpected), unexpected[0])
    return {"missing": list(result.missing_keys), "unexpected": unexpected}
