"""``IslandsCallback``: islands-of-agreement figures and scores during fit, validation and test.

One concern, one Lightning callback (as ``ModelCheckpoint`` is for checkpoints):
the LightningModule only returns ``{"loss", "levels"}`` from its steps, the
DataModule puts the stage-1 masks of the first val images into the val batch
(``batch["masks"]``, see :mod:`partwhole.agglomerator.data`), and this callback

* scores the islands of the val (and test) images that carry masks against those
  masks and logs ``val/islands_pair_corr_L<i>`` and ``val/islands_ari_L<i>``
  (``test/...`` in test) per epoch: the definitions are :mod:`partwhole.islands.scores`';
* with ``plot``, draws one image's islands (:func:`~partwhole.islands.figures.islands_figure`,
  the drawing of a checkpoint's islands) every ``plot_every`` training steps and for
  the first val/test batch, as ``<run>/islands/{stage}_step{global_step:07d}.png``
  and, with a TensorBoard logger, as the figure ``islands/{stage}``.

Figures are drawn on global rank 0 only. Scores: every process scores the images
of its shard that carry masks; at the epoch's end the per-image scores of all
processes are gathered, and the first ``max_scored_images`` by dataset index
are averaged, so N processes log what one does. Columns that hold NaN or inf
(a diverging run) are not scored, so that the divergence check, not scipy,
reports them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from partwhole.islands.figures import islands_figure, save_islands_figure
from partwhole.islands.scores import average_islands_scores, islands_scores

log = logging.getLogger(__name__)


class IslandsCallback(pl.Callback):
    """Islands figures and scores from the steps' ``levels`` and the batch's ``image``, ``embeds`` and ``masks``.

    Args:
        plot: draw figures; scores are logged regardless,
            whenever a val/test batch carries masks.
        plot_every: draw a training figure every this many optimizer steps.
        out_dir: folder of the PNGs; default ``<trainer.default_root_dir>/islands``.
        max_scored_images: score at most this many images of the first batch.
    """

    def __init__(self, *, plot: bool = False, plot_every: int = 50, out_dir: str | Path | None = None,
                 max_scored_images: int = 4):
        super().__init__()
        self.plot = plot
        self.plot_every = max(1, int(plot_every))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.max_scored_images = max_scored_images
        self._step_at_batch_start = 0
        self._warned: set[str] = set()
        self._scored: dict[str, list[tuple[int, dict]]] = {}  # stage -> [(dataset index, scores)] of this process

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # The step this batch trains; global_step has moved on by on_train_batch_end.
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = self._step_at_batch_start
        if self.plot and trainer.is_global_zero and step % self.plot_every == 0:
            levels = self._levels(outputs)
            if levels is not None:
                self._draw(trainer, "train", step, batch, levels)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scored["val"] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._scored["test"] = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "val", outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "test", outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_gathered_scores(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_gathered_scores(trainer, pl_module, "test")

    # ------------------------------------------------------------------ work

    def islands_dir(self, trainer: pl.Trainer) -> Path:
        return self.out_dir if self.out_dir is not None else Path(trainer.default_root_dir) / "islands"

    def _levels(self, outputs: Any) -> torch.Tensor | None:
        levels = outputs.get("levels") if isinstance(outputs, dict) else None
        if levels is None and "levels" not in self._warned:
            self._warned.add("levels")
            log.warning("IslandsCallback: the step returned no 'levels' (return {'loss': ..., 'levels': (b, n, l, d)}); "
                        "no islands figures or scores")
        return levels

    def _eval_batch(self, trainer: pl.Trainer, stage: str, outputs: Any, batch: Any, batch_idx: int,
                    dataloader_idx: int) -> None:
        if dataloader_idx != 0:
            return
        wants_scores = isinstance(batch, dict) and batch.get("masks") is not None
        wants_figure = self.plot and trainer.is_global_zero and batch_idx == 0
        if not (wants_scores or wants_figure):
            return
        levels = self._levels(outputs)
        if levels is None:
            return
        if wants_scores:
            self.score_batch(stage, levels, batch["masks"], batch.get("index"))
        if wants_figure and bool(torch.isfinite(levels[0]).all()):
            self._draw(trainer, stage, trainer.global_step, batch, levels)

    @torch.no_grad()
    def score_batch(self, stage: str, levels: torch.Tensor, masks: list, indices: torch.Tensor | None = None) -> int:
        """Score the images of a batch that carry masks (until ``max_scored_images`` are held); returns how many.

        ``levels`` ``(b, n, l, d)``; ``masks`` one entry per image, bool ``(n, 3, H, W)`` or None;
        ``indices`` the images' dataset indices (default: their order of arrival). Masks with another
        number of points than ``n`` are skipped with a warning, images whose levels are not finite silently.
        """
        if len(masks) != len(levels):
            raise ValueError(f"{len(masks)} images carry masks entries but the step returned levels of {len(levels)}")
        held = self._scored.setdefault(stage, [])
        scored = 0
        for j, image_masks in enumerate(masks):
            if image_masks is None or len(held) >= self.max_scored_images:
                continue
            if image_masks.shape[0] != levels.shape[1]:
                if "points" not in self._warned:
                    self._warned.add("points")
                    log.warning("IslandsCallback: stage-1 masks have %d points but the model %d columns: not scored",
                                image_masks.shape[0], levels.shape[1])
                continue
            if not bool(torch.isfinite(levels[j]).all()):
                continue
            index = int(indices[j]) if indices is not None else len(held)
            held.append((index, islands_scores(levels[j].float().cpu(), image_masks)))
            scored += 1
        return scored

    def log_gathered_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict:
        """Average the first ``max_scored_images`` scored images of all processes (by dataset index) and log it.

        Every process logs the same values. Returns ``{level: {name: value}}`` (empty when nothing was scored).
        """
        held = self._scored.pop(stage, [])
        if trainer.world_size > 1:
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, held)
            held = [item for part in gathered for item in part]
        first = sorted(dict(held).items())[: self.max_scored_images]  # an index seen twice counts once
        if not first:
            return {}
        scores = average_islands_scores(scores for _, scores in first)
        for level, values in scores.items():
            for name, value in values.items():
                if value == value:  # not NaN
                    pl_module.log(f"{stage}/islands_{name}_L{level}", float(value), on_step=False, on_epoch=True,
                                  batch_size=len(first), sync_dist=True)  # the same on every process
        return scores

    @torch.no_grad()
    def _draw(self, trainer: pl.Trainer, stage: str, step: int, batch: dict, levels: torch.Tensor) -> None:
        """One image's islands (and its teacher embeddings) into ``<run>/islands`` and the TensorBoard logger."""
        image = batch["image"]
        image = image[0, 0] if image.ndim == 5 else image[0]  # two crops: the first crop of the first image
        teacher = batch.get("embeds", batch.get("targets"))  # precomputed targets: the normalised (reduced) embeddings
        fig = islands_figure(image.float().cpu(), levels[0].float().cpu(),
                             teacher=None if teacher is None else teacher[0].float().cpu(), title=f"{stage} step {step}")
        save_islands_figure(fig, self.islands_dir(trainer) / f"{stage}_step{step:07d}.png")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure(f"islands/{stage}", fig, global_step=step)
