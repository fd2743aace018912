"""``classify`` (fine-tuning): cross-entropy of the classification head on the top level. The backbone is frozen
(no gradient, BatchNorm statistics fixed), as the reference's, unless ``finetune_backbone``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from partwhole.agglomerator.objectives.base import Objective


class Classify(Objective):
    """Trains the classification head (and, with ``finetune_backbone``, the backbone); logs ``<stage>/accuracy``
    and chooses the best checkpoint by ``val/accuracy``."""

    name = "classify"
    heads = ("classification_head_from_last_level.",)
    augmentation = "label_preserving"
    monitor = ("val/accuracy", "max")
    fine_tunes = True

    def __init__(self, training, model):
        super().__init__(training, model)
        self.freezes_backbone = not training.finetune_backbone
        self.accuracy = nn.ModuleDict({f"{stage}_acc": MulticlassAccuracy(num_classes=model.config.n_classes, average="micro")
                                       for stage in ("train", "val", "test")})

    def state(self) -> dict[str, nn.Module]:
        return {"accuracy": self.accuracy}

    def loss(self, lit, out, batch, stage):
        label = batch["label"]
        logits = lit.model.classify(out.top_level)
        loss = F.cross_entropy(logits, label)
        metric = self.accuracy[f"{stage}_acc"]
        metric(logits, label)
        lit.log(f"{stage}/accuracy", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=label.shape[0])
        return loss
