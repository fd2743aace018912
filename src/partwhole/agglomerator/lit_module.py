"""The LightningModule around :class:`~partwhole.agglomerator.model.Agglomerator`: one ``shared_step`` for train /
val / test, the optimiser and its schedule, logging; the objective (:data:`~partwhole.agglomerator.objectives.OBJECTIVES`:
``sam_distill``, ``supcon`` or ``classify``) supplies the loss and metrics.

Each objective trains only what its loss reads (its ``heads``): the other objectives' heads stay in the model,
under the reference's names, but frozen, as DDP needs every trainable parameter to get a gradient in every step.

The settings are a :class:`TrainingConfig`; ``save_hyperparameters`` keeps them as plain values beside the model's,
so every checkpoint loads without flags: ``AgglomeratorLitModule.load_from_checkpoint(path)``, or
``AgglomeratorLitModule(**checkpoint["hyper_parameters"])``.

Every step returns ``{"loss", "levels"}`` (the final levels ``(b, n, l, d)``,
detached): callbacks such as :class:`~partwhole.agglomerator.islands_callback.IslandsCallback`
draw and score the islands from them in their ``on_*_batch_end`` hooks.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from partwhole.agglomerator.model import HEAD_PREFIXES, Agglomerator, AgglomeratorConfig
from partwhole.agglomerator.objectives import (
    DEFAULT_LEVEL_WEIGHTS,
    frozen_heads,
    objective_class,
)
from partwhole.common.errors import check_choice

log = logging.getLogger(__name__)

OPTIMIZERS = ("lion", "adamw")
SCHEDULERS = ("onecycle", "constant")
LEGACY_HPARAMS = ("plot_islands", "plot_every")  # saved by versions that drew islands here: accepted, ignored


@dataclass
class TrainingConfig:
    """What the LightningModule trains and how: the objective, its settings and the optimiser's.

    ``embed_dim``: the teacher's D (default: what the model outputs); ``target_dim``: regress the ``target_dim``
    leading principal axes of the normalised targets instead of all D
    (:class:`~partwhole.agglomerator.targets.TargetSpace`; the model must then output ``target_dim``).
    ``distill_loss``: ``mse``, ``smooth_l1`` or ``cosine``
    (:func:`~partwhole.agglomerator.objectives.levels_distill_loss`). The field order is the hyper-parameters' order
    in checkpoints.
    """

    objective: str = "sam_distill"  # a name of OBJECTIVES
    learning_rate: float = 3e-4
    weight_decay: float = 0.05
    optimizer: str = "lion"  # lion | adamw
    lion_betas: Sequence[float] = (0.95, 0.98)
    scheduler: str = "onecycle"  # onecycle | constant
    level_weights: Sequence[float] = DEFAULT_LEVEL_WEIGHTS  # sam_distill: loss weight per level, low to high
    temperature: float = 0.07  # supcon
    finetune_backbone: bool = False  # classify: train the backbone too
    teacher_norm: str = "none"  # sam_distill: none | dataset | layer
    embed_dim: int | None = None  # sam_distill
    target_dim: int | None = None  # sam_distill
    distill_loss: str = "mse"  # sam_distill

    def validate(self) -> None:
        """Raise :class:`~partwhole.common.errors.SettingError` naming the field of a bad setting."""
        objective_class(self.objective)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("scheduler", self.scheduler, SCHEDULERS)

    @classmethod
    def from_hparams(cls, hparams: dict) -> TrainingConfig:
        """From a checkpoint's hyper-parameters (less ``model``), those of earlier versions included."""
        return cls(**{k: v for k, v in hparams.items() if k not in LEGACY_HPARAMS})


class AgglomeratorLitModule(pl.LightningModule):
    def __init__(self, model: dict, training: TrainingConfig | None = None, **settings):
        """``model``: an :class:`AgglomeratorConfig` as a dict; ``training``: the settings, or as keywords
        ``settings`` (the fields of :class:`TrainingConfig`, as checkpoints keep them)."""
        super().__init__()
        if training is None:
            training = TrainingConfig.from_hparams(settings)
        elif settings:
            raise TypeError(f"give the settings as training or as keywords, not both ({', '.join(settings)})")
        training.validate()
        self.save_hyperparameters({"model": model, **asdict(training)})
        cls = objective_class(training.objective)
        self.model = Agglomerator(AgglomeratorConfig(**{**model, "contrastive_head": model.get("contrastive_head", False)
                                                        or cls.contrastive_head}))
        self.objective = cls(training, self.model)
        self.frozen_backbone = self.objective.freezes_backbone
        if self.frozen_backbone:
            for p in self.model.backbone_parameters():
                p.requires_grad_(False)
        other_heads = frozen_heads(cls.name)
        for name, p in self.model.named_parameters():
            if name.startswith(other_heads):
                p.requires_grad_(False)
        for name, module in self.objective.state().items():  # names of earlier versions: targets.*, accuracy.*, r2.*
            self.add_module(name, module)
        self.eval_loss = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})  # states not saved
        self._register_load_state_dict_pre_hook(self._upgrade_state_dict)

    def _upgrade_state_dict(self, state_dict, prefix, *args) -> None:
        self.objective.upgrade_state_dict(state_dict, prefix)

    # ------------------------------------------------------------------ forward / steps

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
        image = batch["image"]
        with torch.no_grad() if self.frozen_backbone else nullcontext():
            out = self.model(image.flatten(0, 1) if image.ndim == 5 else image)
        loss = self.objective.loss(self, out, batch, stage)
        batch_size = image.shape[0]
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
        self.objective.log_epoch_end(self, "train")

    def on_validation_epoch_end(self) -> None:
        self.objective.log_epoch_end(self, "val")

    def on_test_epoch_end(self) -> None:
        self.objective.log_epoch_end(self, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Top-level features ``(b, n, d)`` and labels: what the freeze mode of the command line writes."""
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
