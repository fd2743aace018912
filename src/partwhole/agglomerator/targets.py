"""What ``sam_distill`` regresses, and how much of it the student has learned.

The teacher's embeddings of an image, ``(n, l, D)`` (columns, levels, the teacher's
dimension), become the student's targets in two steps, both fitted on the train split
and kept as buffers (so every checkpoint carries them):

1. normalise (``teacher_norm``): ``dataset`` z-scores every dimension with train-set
   statistics; ``layer`` whitens each target vector on its own (a LayerNorm without affine
   over its D, as feature-distillation work does: every target gets mean 0 and unit
   variance over its dimensions, so none weighs more by its norm); ``none`` keeps the
   embeddings as stage 2 wrote them;
2. reduce (``target_dim=k``, optional): project onto the ``k`` leading principal axes
   of the normalised train targets. The levels encoder then maps to ``k`` instead of
   ``D`` (or there is no encoder, when ``k`` equals ``patch_dim``), which is where most
   of a toy pretraining step went at ``D = 1280``. The axes are orthonormal, so the
   squared error in the reduced coordinates is the squared error in ``D`` dimensions of
   the student's prediction mapped back, minus what lies outside the kept axes.

How much the student learned is measured against the best prediction that ignores the
image: the train-set mean target of every column and level. ``distill_r2 = 1 - SSE(student) /
SSE(mean target)``, with the loss's level weights, always in the full normalised ``D``
dimensions (with a reduction, the part of each target outside the kept axes counts as the
student's error: it cannot predict it). 0 is the mean predictor, 1 a perfect student.
Beside it, ``image_mean_r2`` is what an oracle that knows each image's mean target over its
columns would reach: the share of the targets that is image-level rather than per column.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric

from partwhole.common.errors import SettingError, check_choice

NORMS = ("none", "dataset", "layer")
LAYER_EPS = 1e-5  # teacher_norm=layer: as torch.nn.functional.layer_norm's default
STD_FLOOR = 0.1  # teacher_norm=dataset: no feature's std below this fraction of the median feature's


def dataset_std(flat: np.ndarray, std_floor: float = STD_FLOOR) -> np.ndarray:
    """Per-dimension std of ``flat`` ``(samples, D)``, each at least ``std_floor`` times the median std.

    A nearly dead feature (a ReLU that is 0 on almost every sample) would otherwise be divided by a
    tiny number, and one image where it fires would dominate the whole loss (seen with a random-weight
    teacher: a validation loss of 2,000 instead of about 1).
    """
    std = flat.std(0)
    return np.maximum(std, std_floor * float(np.median(std)))


class TargetSpace(nn.Module):
    """The normalisation and optional PCA reduction of the teacher's embeddings, fitted once on train.

    ``teacher_dim`` D, ``num_patches`` n, ``levels`` l; ``target_dim`` k (None: no reduction).
    Buffers: ``mean``/``std`` ``(D,)`` (``norm="dataset"`` only; identity otherwise), ``column_mean`` ``(n, l, D)``
    (the mean predictor, normalised), and with a reduction ``center`` ``(D,)``, ``components``
    ``(k, D)`` (rows orthonormal) and ``explained`` ``(k,)`` (each axis's share of the variance).
    """

    def __init__(self, teacher_dim: int, num_patches: int, levels: int, norm: str = "dataset", target_dim: int | None = None):
        super().__init__()
        check_choice("teacher_norm", norm, NORMS)
        if target_dim is not None and not 0 < target_dim <= teacher_dim:
            raise SettingError("target_dim", target_dim, f"give a number of dimensions between 1 and the teacher's D = {teacher_dim}")
        self.norm, self.target_dim = norm, target_dim
        self.register_buffer("mean", torch.zeros(teacher_dim))
        self.register_buffer("std", torch.ones(teacher_dim))
        self.register_buffer("column_mean", torch.zeros(num_patches, levels, teacher_dim))
        if target_dim is not None:
            self.register_buffer("center", torch.zeros(teacher_dim))
            self.register_buffer("components", torch.eye(teacher_dim)[:target_dim].clone())
            self.register_buffer("explained", torch.zeros(target_dim))

    @property
    def out_dim(self) -> int:
        """What the student outputs per column and level: k, or D without a reduction."""
        return self.target_dim or self.mean.numel()

    @torch.no_grad()
    def fit(self, embeds: np.ndarray | torch.Tensor) -> None:
        """Fit every statistic on train embeddings ``(N, n, l, D)`` (a sample of the split's images)."""
        x = torch.as_tensor(np.asarray(embeds), dtype=torch.float32)
        flat = x.reshape(-1, x.shape[-1])
        if self.norm == "dataset":
            self.mean.copy_(flat.mean(0))
            self.std.copy_(torch.from_numpy(dataset_std(flat.numpy())))
        z = self.normalise(x)
        self.column_mean.copy_(z.mean(0))
        if self.target_dim is not None:
            zflat = z.reshape(-1, z.shape[-1])
            center = zflat.mean(0)
            centred = zflat - center
            covariance = (centred.T @ centred).double() / max(1, len(centred) - 1)
            values, vectors = torch.linalg.eigh(covariance)  # ascending
            order = values.flip(0)[: self.target_dim]
            self.center.copy_(center)
            self.components.copy_(vectors.flip(1)[:, : self.target_dim].T.float())
            self.explained.copy_((order / values.sum().clamp(min=1e-12)).float())

    def normalise(self, embeds: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` embeddings -> normalised targets (float32)."""
        embeds = embeds.float()
        if self.norm == "dataset":
            return (embeds - self.mean) / self.std.clamp(min=1e-6)
        if self.norm == "layer":
            return torch.nn.functional.layer_norm(embeds, embeds.shape[-1:], eps=LAYER_EPS)
        return embeds

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Raw embeddings ``(..., D)`` -> what the student regresses ``(..., k or D)``."""
        return self.reduce(self.normalise(embeds))

    def reduce(self, normalised: torch.Tensor) -> torch.Tensor:
        """Normalised targets ``(..., D)`` -> what the student regresses ``(..., k)`` (or themselves)."""
        if self.target_dim is None:
            return normalised
        return (normalised - self.center) @ self.components.T

    def constants(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the scores need of raw embeddings ``(b, n, l, D)`` beyond the student's targets, ``(b, n, l)`` each
        (independent of the student: computed once per item when the targets are precomputed).

        ``outside``: squared norm of the part of each normalised target outside the kept axes (0 without a
        reduction); ``mean``: squared error of the train-set mean target of its column and level; ``image``:
        squared error of its image's own mean over the columns (an oracle: the image-level share).
        """
        z = self.normalise(embeds)
        mean = (z - self.column_mean).square().sum(-1)
        image = (z - z.mean(dim=1, keepdim=True)).square().sum(-1)
        if self.target_dim is None:
            outside = torch.zeros_like(mean)
        else:
            centred = z - self.center
            outside = (centred.square().sum(-1) - (centred @ self.components.T).square().sum(-1)).clamp(min=0)
        return {"outside": outside, "mean": mean, "image": image}

    def errors(self, prediction: torch.Tensor, targets: torch.Tensor, constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-level sums of squared errors in the normalised D dimensions, ``(l,)`` each.

        ``prediction`` ``(b, n, l, k or D)`` (the student's output), ``targets`` what it regresses
        (``self(embeds)``), ``constants`` ``self.constants(embeds)``. Keys: ``student`` (with a reduction, its
        error on the kept axes plus what lies outside them: exactly the squared error of its prediction mapped
        back to D), ``mean`` (the train-set mean target of every column and level), ``image`` (each image's own
        mean over its columns).
        """
        student = (prediction.float() - targets.float()).square().sum(-1) + constants["outside"]
        return {"student": student.sum(dim=(0, 1)), "mean": constants["mean"].sum(dim=(0, 1)),
                "image": constants["image"].sum(dim=(0, 1))}


class DistillR2(Metric):
    """``distill_r2`` over an epoch: sums of squared errors accumulated per level (DDP: summed over ranks).

    :meth:`compute` returns ``{"distill_r2", "image_mean_r2", "distill_r2_l0", ...}``: the weighted
    totals use the loss's level weights, the per-level values none.
    """

    full_state_update = False

    def __init__(self, levels: int, level_weights: Sequence[float]):
        super().__init__()
        self.register_buffer("weights", torch.tensor(list(level_weights), dtype=torch.float64), persistent=False)
        for name in ("student", "mean", "image"):
            self.add_state(name, default=torch.zeros(levels, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, errors: dict[str, torch.Tensor]) -> None:
        for name in ("student", "mean", "image"):
            setattr(self, name, getattr(self, name) + errors[name].detach().double())

    def compute(self) -> dict[str, torch.Tensor]:
        weights = self.weights.to(self.mean.device)
        base = (self.mean * weights).sum().clamp(min=1e-12)
        out = {"distill_r2": 1 - (self.student * weights).sum() / base, "image_mean_r2": 1 - (self.image * weights).sum() / base}
        for level in range(len(self.mean)):
            out[f"distill_r2_l{level}"] = 1 - self.student[level] / self.mean[level].clamp(min=1e-12)
        return {k: v.float() for k, v in out.items()}
