"""What every training objective of the Agglomerator supplies (:class:`Objective`); the registry is
:data:`partwhole.agglomerator.objectives.OBJECTIVES`.

An objective owns everything that differs between objectives: the heads of the model its loss reads (the
others stay frozen), what a batch must carry and how training images are augmented (the data module asks),
its targets, loss and metrics, and what the run monitors. The LightningModule
(:class:`~partwhole.agglomerator.lit_module.AgglomeratorLitModule`) runs the model once per batch and hands the
output to its objective; it never asks which objective it holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from partwhole.agglomerator.lit_module import TrainingConfig
    from partwhole.agglomerator.model import Agglomerator, AgglomeratorOutput

# How the data module augments an objective's training images (evaluation images never are).
AUGMENTATIONS = (
    "none",  # the targets are tied to the patch grid: no geometric augmentation (sam_distill)
    "two_crops",  # two random resized crops / flips / colour jitters of every image, (2, c, H, W) (supcon)
    "label_preserving",  # a flip (image folders) or RandAugment (torchvision datasets), as the reference (classify)
)


class Objective:
    """One training objective; a subclass sets the class attributes and implements :meth:`loss`.

    Built by the LightningModule with its :class:`~partwhole.agglomerator.lit_module.TrainingConfig` and its
    model; the modules of :meth:`state` are registered on the LightningModule under their names (so checkpoints
    keep the names earlier versions wrote, such as ``targets.mean``).
    """

    name: ClassVar[str]
    heads: ClassVar[tuple[str, ...]] = ()  # parameter-name prefixes of the model's heads its loss reads
    contrastive_head: ClassVar[bool] = False  # the model must be built with its contrastive head
    needs_embeddings: ClassVar[bool] = False  # batches carry the stage-2 teacher embeddings (``embeds``)
    augmentation: ClassVar[str] = "none"  # one of AUGMENTATIONS
    monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")  # the metric the best checkpoint is chosen by, and its mode
    fine_tunes: ClassVar[bool] = False  # trains on a pretrained backbone (a warning when it starts from none)

    def __init__(self, training: TrainingConfig, model: Agglomerator):
        self.freezes_backbone = False  # no gradient, BatchNorm statistics fixed (classify, by default)

    def state(self) -> dict[str, nn.Module]:
        """The modules (targets, metrics) the LightningModule registers under these names."""
        return {}

    def loss(self, lit: pl.LightningModule, out: AgglomeratorOutput, batch: dict, stage: str) -> torch.Tensor:
        """The loss of one batch (``stage``: train, val or test), after logging its metrics through ``lit.log``.

        ``out`` is the model's output for ``batch["image"]`` (two crops flattened: image ``j``'s crops are rows
        ``2j`` and ``2j+1``).
        """
        raise NotImplementedError

    def log_epoch_end(self, lit: pl.LightningModule, stage: str) -> None:
        """Log what is computed once per epoch (``stage``: train, val or test)."""

    @property
    def teacher_dim(self) -> int | None:
        """The teacher embeddings' D the batches must carry (None: the objective reads none)."""
        return None

    def prepare_training(self, lit: pl.LightningModule, datamodule, resumed_state: dict | None = None,
                         precompute: bool = False) -> str | None:
        """Before ``lit`` trains: fit what the objective fits on the data (``resumed_state``: the state dict of the
        run being continued, to take it from instead); with ``precompute``, let the data module's splits hold what
        can be computed once. Returns a line for the user, or None."""
        return None

    def upgrade_state_dict(self, state_dict: dict, prefix: str) -> None:
        """Rename or complete, in place, the entries of a checkpoint written by an earlier version."""
