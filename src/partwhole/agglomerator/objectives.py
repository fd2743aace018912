"""Training objectives of the Agglomerator.

* ``sam_distill`` (the paper): regress every column's final levels (through the
  levels encoder when there is one) onto the stage-2 embeddings of SAM's
  sub-part / part / whole masks at that column's point.
* ``supcon`` (the paper's baseline, the original Agglomerator): supervised
  contrastive loss on two augmented crops (Khosla et al. 2020).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_LEVEL_WEIGHTS = (0.1, 0.2, 0.7)  # levels 0 / 1 / 2 (reference)


DISTILL_LOSSES = ("mse", "smooth_l1", "cosine")


def levels_distill_loss(encoded: torch.Tensor, embeds: torch.Tensor, level_weights: Sequence[float] = DEFAULT_LEVEL_WEIGHTS,
                        kind: str = "mse") -> torch.Tensor:
    """Weighted per-level loss between ``encoded`` and ``embeds``, both ``(b, n, l, D)``: ``sum_i w_i * loss_i``.

    ``kind`` (``--distill_loss``): ``mse``, ``mean((encoded[:, :, i] - embeds[:, :, i])**2)`` (the reference);
    ``smooth_l1``, the same mean of the Huber loss with ``beta = 1`` (quadratic below one unit of the
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
        raise ValueError(f"--distill_loss={kind!r}: choose one of {', '.join(DISTILL_LOSSES)}")
    return (per_level * per_level.new_tensor(level_weights)).sum()


def supcon_loss(features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.07,
                base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (SimCLR's when ``labels`` is None).

    ``features``: ``(b, views, dim)`` L2-normalised; ``labels``: ``(b,)``. Every view
    is an anchor; positives are the other views of the same image and (with
    labels) all views of images of the same class.
    """
    b, views, _ = features.shape
    feats = torch.cat(features.unbind(dim=1)).float()  # (views*b, dim), view-major
    if labels is None:
        labels = torch.arange(b, device=features.device)
    labels = labels.repeat(views)
    logits = feats @ feats.T / temperature
    self_mask = torch.eye(len(feats), dtype=torch.bool, device=feats.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1).clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()
