"""``supcon`` (the paper's baseline, the original Agglomerator): supervised contrastive loss (Khosla et al. 2020) on
two augmented crops of every image, through the model's contrastive head."""

from __future__ import annotations

import torch

from partwhole.agglomerator.objectives.base import Objective


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


class SupCon(Objective):
    """Trains the contrastive head (``contr_dim`` features of the top level); train batches carry two crops,
    ``image`` ``(b, 2, c, H, W)``, evaluation batches one."""

    name = "supcon"
    heads = ("contrastive_head.",)
    contrastive_head = True
    augmentation = "two_crops"

    def __init__(self, training, model):
        super().__init__(training, model)
        self.temperature = training.temperature

    def loss(self, lit, out, batch, stage):
        image = batch["image"]
        feats = lit.model.project(out.top_level)
        feats = feats.view(image.shape[0], 2, -1) if image.ndim == 5 else feats.unsqueeze(1)
        return supcon_loss(feats, batch["label"], temperature=self.temperature)
