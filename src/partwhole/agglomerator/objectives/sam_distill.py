"""``sam_distill`` (the paper): regress every column's final levels (through the levels encoder when there is one)
onto the stage-2 embeddings of SAM's sub-part / part / whole masks at that column's point.

The loss is level-weighted (``level_weights``) and one of :data:`DISTILL_LOSSES` (``distill_loss``: MSE, the
reference's, smooth L1 or cosine), on the targets of :class:`~partwhole.agglomerator.targets.TargetSpace`
(normalised, optionally PCA-reduced). Every stage also logs ``distill_r2``, how much of the targets the student
predicts beyond their train-set mean (always in squared error, whichever loss trains).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from partwhole.agglomerator.objectives.base import Objective
from partwhole.agglomerator.targets import DistillR2, TargetSpace
from partwhole.common.errors import SettingError, check_choice

DEFAULT_LEVEL_WEIGHTS = (0.1, 0.2, 0.7)  # levels 0 / 1 / 2 (reference)
DISTILL_LOSSES = ("mse", "smooth_l1", "cosine")
STAGES = ("train", "val", "test")


def levels_distill_loss(encoded: torch.Tensor, embeds: torch.Tensor, level_weights: Sequence[float] = DEFAULT_LEVEL_WEIGHTS,
                        kind: str = "mse") -> torch.Tensor:
    """Weighted per-level loss between ``encoded`` and ``embeds``, both ``(b, n, l, D)``: ``sum_i w_i * loss_i``.

    ``kind`` (the ``distill_loss`` setting): ``mse``, ``mean((encoded[:, :, i] - embeds[:, :, i])**2)`` (the
    reference); ``smooth_l1``, the same mean of the Huber loss with ``beta = 1`` (quadratic below one unit of the
    normalised targets, linear above: an outlier target pulls less); ``cosine``, the mean over columns of
    ``1 - cos(encoded, embeds)`` along ``D`` (each target's direction only, its norm free).
    """
    if encoded.shape != embeds.shape:
        raise ValueError(f"model levels {tuple(encoded.shape)} and teacher embeddings {tuple(embeds.shape)} differ in shape")
    if len(level_weights) != encoded.shape[2]:
        raise ValueError(f"{len(level_weights)} level weights given for {encoded.shape[2]} levels")
    encoded, embeds = encoded.float(), embeds.float()
    if kind == "mse":
        per_level = (encoded - embeds).square().mean(dim=(0, 1, 3))  # (l,)
    elif kind == "smooth_l1":
        per_level = F.smooth_l1_loss(encoded, embeds, reduction="none", beta=1.0).mean(dim=(0, 1, 3))
    elif kind == "cosine":
        per_level = (1 - F.cosine_similarity(encoded, embeds, dim=-1)).mean(dim=(0, 1))
    else:
        check_choice("distill_loss", kind, DISTILL_LOSSES)
    return (per_level * per_level.new_tensor(level_weights)).sum()


class SamDistill(Objective):
    """Trains the levels encoder (when there is one); batches carry ``embeds`` ``(b, n, l, D)`` or, precomputed in
    memory, ``targets`` and ``target_constants``. Owns ``targets`` (its buffers are saved in checkpoints, outside
    ``model.``) and ``r2``."""

    name = "sam_distill"
    heads = ("levels_encoder.",)
    needs_embeddings = True

    def __init__(self, training, model):
        super().__init__(training, model)
        config = model.config
        check_choice("distill_loss", training.distill_loss, DISTILL_LOSSES)
        self.level_weights = tuple(training.level_weights)
        if len(self.level_weights) != config.levels:
            raise SettingError("level_weights", ",".join(f"{w:g}" for w in self.level_weights),
                               f"{len(self.level_weights)} values for levels={config.levels}: give one weight per level")
        self.kind = training.distill_loss
        # Fitted by fit_targets() before training.
        self.targets = TargetSpace(training.embed_dim or model.embed_dim, config.num_patches, config.levels,
                                   norm=training.teacher_norm, target_dim=training.target_dim)
        if self.targets.out_dim != model.embed_dim:
            setting = "target_dim" if training.target_dim else "embed_dim"
            raise SettingError(setting, self.targets.out_dim,
                               f"the model outputs {model.embed_dim} dimensions per level but the targets have "
                               f"{self.targets.out_dim}: set levels_encoder_dim={self.targets.out_dim} (with levels_encoder)"
                               + (" or target_dim to the model's output" if training.target_dim else ""))
        self.targets_fitted = True  # False for a checkpoint written before the mean predictor was kept
        self.r2 = nn.ModuleDict({f"{stage}_r2": DistillR2(config.levels, self.level_weights) for stage in STAGES})

    def state(self) -> dict[str, nn.Module]:
        return {"targets": self.targets, "r2": self.r2}

    @property
    def teacher_dim(self) -> int:
        return self.targets.mean.numel()

    def fit_targets(self, embeds) -> None:
        """Fit the targets' normalisation, mean predictor and reduction on train embeddings ``(N, n, l, D)``."""
        self.targets.fit(embeds)
        self.targets_fitted = True

    def prepare_training(self, lit, datamodule, resumed_state=None, precompute=False):
        """Fit the targets on a sample of the train split's embeddings, or load the resumed run's (Lightning restores
        the rest later, but the train targets are computed before); with ``precompute`` the splits then hold their
        targets instead of the embeddings."""
        if resumed_state is None:
            self.fit_targets(datamodule.splits["train"].sample_embeddings())
        else:
            lit.load_state_dict(resumed_state)
        if precompute:  # batches then carry the targets themselves (computed once, not per step)
            for split in {id(d): d for d in datamodule.splits.values()}.values():
                split.precompute_targets(self.targets)
        if not self.targets.target_dim:
            return None
        return (f"targets: the {self.targets.target_dim} leading principal axes of the teacher's D = "
                f"{self.targets.mean.numel()} keep {self.targets.explained.sum():.1%} of its variance")

    def loss(self, lit, out, batch, stage):
        targets = batch["targets"] if "targets" in batch else self.targets(batch["embeds"])
        loss = levels_distill_loss(out.encoded, targets, self.level_weights, self.kind)
        if self.targets_fitted:  # train: the epoch's batches as the weights change (overfitting shows as train >> val)
            constants = batch["target_constants"] if "target_constants" in batch else self.targets.constants(batch["embeds"])
            self.r2[f"{stage}_r2"].update(self.targets.errors(out.encoded, targets, constants))
        return loss

    def log_epoch_end(self, lit, stage):
        """``<stage>/distill_r2`` (level-weighted, in the progress bar), ``<stage>/image_mean_r2`` and per level."""
        metric = self.r2[f"{stage}_r2"]
        if not self.targets_fitted or not metric.update_count:
            return
        values = metric.compute()  # its sums are reduced over the processes first: every process holds the same
        metric.reset()
        lit.log(f"{stage}/distill_r2", values.pop("distill_r2"), prog_bar=True, sync_dist=True)
        lit.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=True)

    def upgrade_state_dict(self, state_dict, prefix):
        """Checkpoints of earlier versions: ``teacher_mean``/``teacher_std`` are now ``targets.mean``/``.std``;
        without ``targets.column_mean`` (or with no normalisation saved) the missing statistics keep their
        neutral values and ``distill_r2`` is not logged."""
        for old, new in (("teacher_mean", "targets.mean"), ("teacher_std", "targets.std")):
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        for name, buffer in self.targets.named_buffers():
            if prefix + "targets." + name not in state_dict:
                state_dict[prefix + "targets." + name] = buffer.clone()
                if name == "column_mean":
                    self.targets_fitted = False
