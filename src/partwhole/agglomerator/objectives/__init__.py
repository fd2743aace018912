"""Training objectives of the Agglomerator: one module each, and the registry :data:`OBJECTIVES`.

* ``sam_distill`` (the paper, :mod:`.sam_distill`): regress the columns' levels onto SAM-mask embeddings;
* ``supcon`` (the paper's baseline, :mod:`.supcon`): supervised contrastive loss on two crops;
* ``classify`` (fine-tuning, :mod:`.classify`): the classification head on the top level.

An objective (:class:`~partwhole.agglomerator.objectives.base.Objective`) owns the heads it trains, what a batch
must carry, its targets, loss and metrics. A new one is a module with an ``Objective`` subclass and an entry here;
its heads must be parts of the model (``model.py``) whose names, like every parameter's, are the reference's.
"""

from __future__ import annotations

from partwhole.agglomerator.objectives.base import AUGMENTATIONS, Objective
from partwhole.agglomerator.objectives.classify import Classify
from partwhole.agglomerator.objectives.sam_distill import (
    DEFAULT_LEVEL_WEIGHTS,
    DISTILL_LOSSES,
    SamDistill,
    levels_distill_loss,
)
from partwhole.agglomerator.objectives.supcon import SupCon, supcon_loss
from partwhole.common.errors import check_choice

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (SamDistill, SupCon, Classify)}


def objective_class(name: str) -> type[Objective]:
    """The registry's entry ``name``, or a :class:`~partwhole.common.errors.SettingError` naming ``objective``."""
    check_choice("objective", name, OBJECTIVES)
    return OBJECTIVES[name]


def frozen_heads(name: str) -> tuple[str, ...]:
    """The parameter-name prefixes of the other objectives' heads, which objective ``name`` keeps frozen: the model
    keeps them (checkpoints keep the reference's names), and under DDP every parameter that requires a gradient must
    get one in every step."""
    own = set(objective_class(name).heads)
    return tuple(head for cls in OBJECTIVES.values() for head in cls.heads if head not in own)


__all__ = ["AUGMENTATIONS", "DEFAULT_LEVEL_WEIGHTS", "DISTILL_LOSSES", "OBJECTIVES", "Classify", "Objective", "SamDistill",
           "SupCon", "frozen_heads", "levels_distill_loss", "objective_class", "supcon_loss"]
