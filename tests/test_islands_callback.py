"""IslandsCallback alone with a tiny model on CPU: figures named as before, val/test scores from masks in the batch."""

import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fakes import make_image_folder
from pytorch_lightning.loggers import Logger

from partwhole.agglomerator.data import DataConfig, PartWholeDataModule
from partwhole.agglomerator.islands_callback import IslandsCallback
from partwhole.agglomerator.lit_module import AgglomeratorLitModule
from partwhole.common.mask_io import save_masks
from partwhole.islands.scores import islands_scores

TINY_MODEL = dict(image_size=32, conv_image_size=8, patch_size=4, patch_dim=32, levels=3, n_classes=2)  # 2x2 columns


class FigureRecorder(Logger):
    """A logger whose ``experiment`` records ``add_figure`` calls, like TensorBoard's."""

    def __init__(self):
        super().__init__()
        self.figures: list[tuple[str, int]] = []

    name, version = "recorder", 0

    @property
    def experiment(self):
        return self

    def add_figure(self, tag, figure, global_step=None):
        self.figures.append((tag, global_step))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny Imagenette layout (8 images a split) with stage-1 masks for val images 0 and 1 (4 points, 3 levels)."""
    root = tmp_path_factory.mktemp("data")
    base = make_image_folder(root, per_class=4)
    rng = np.random.default_rng(0)
    for i in range(2):
        save_masks(base / "val_masks" / "a_cls" / f"img{i}.pkl", rng.random((4, 3, 32, 32)) > 0.5)
    return root


def datamodule(data_dir, val_masks_items=4):
    config = DataConfig(data_dir=str(data_dir), image_size=32, batch_size=4, objective="sam_distill",
                        val_masks_items=val_masks_items)
    dm = PartWholeDataModule(config, expected_embed_shape=(4, 3, 32))
    dm.setup()
    return dm


def test_val_batch_carries_masks_of_the_first_items_only(data_dir):
    dm = datamodule(data_dir, val_masks_items=3)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 3, 32, 32) and val["embeds"].shape == (4, 4, 3, 32)
    masks = val["masks"]  # items 0, 1 have files; item 2 has none; item 3 is past val_masks_items
    assert len(masks) == 4 and masks[2] is None and masks[3] is None
    assert masks[0].dtype == torch.bool and masks[0].shape == (4, 3, 32, 32)
    assert "masks" not in next(iter(dm.train_dataloader()))  # training batches are unchanged
    assert "masks" not in next(iter(datamodule(data_dir, val_masks_items=0).val_dataloader()))


def test_callback_draws_and_scores_during_fit_and_test(data_dir, tmp_path):
    torch.manual_seed(0)
    module = AgglomeratorLitModule(model=TINY_MODEL, objective="sam_distill", optimizer="adamw", scheduler="constant")
    assert not any(hasattr(module, name) for name in ("islands_dir", "val_mask_paths", "plot_islands"))
    recorder = FigureRecorder()
    callback = IslandsCallback(plot=True, plot_every=2)
    trainer = pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_epochs=1, limit_train_batches=2,
                         limit_val_batches=1, limit_test_batches=1, num_sanity_val_steps=0, logger=recorder,
                         callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    dm = datamodule(data_dir)
    trainer.fit(module, datamodule=dm)
    # 8 train images, batch 4: steps 0 and 1; plot_every=2 draws step 0. Val ran after step 2.
    names = sorted(p.name for p in (tmp_path / "islands").glob("*.png"))
    assert names == ["train_step0000000.png", "val_step0000002.png"]
    assert recorder.figures == [("islands/train", 0), ("islands/val", 2)]
    for level in range(3):
        for name in ("pair_corr", "ari"):
            assert f"val/islands_{name}_L{level}" in trainer.callback_metrics
    # The logged score is the mean over the two val images that have masks, from the model's final levels.
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        levels = module.model(batch["image"]).levels
    expected = np.mean([islands_scores(levels[j], batch["masks"][j])[0]["ari"] for j in range(2)])
    assert float(trainer.callback_metrics["val/islands_ari_L0"]) == pytest.approx(expected, abs=1e-5)

    results = trainer.test(module, datamodule=dm, verbose=False)
    assert "test/islands_ari_L2" in results[0] and (tmp_path / "islands" / "test_step0000002.png").is_file()


def test_scores_without_plot_and_mismatched_masks_are_skipped(tmp_path, caplog):
    callback = IslandsCallback(plot=False, out_dir=tmp_path / "figs", max_scored_images=1)
    logged = {}

    class Module:
        def log(self, name, value, **kwargs):
            logged[name] = value

    class Trainer:
        world_size = 1

    levels = torch.randn(3, 4, 3, 8)
    masks = [None, torch.rand(4, 3, 16, 16) > 0.5, torch.rand(4, 3, 16, 16) > 0.5]
    assert callback.score_batch("val", levels, masks, torch.tensor([0, 1, 2])) == 1  # max_scored_images=1: image 1
    scores = callback.log_gathered_scores(Trainer(), Module(), "val")
    assert set(scores) == {0, 1, 2}
    assert scores[0]["ari"] == pytest.approx(islands_scores(levels[1], masks[1])[0]["ari"])
    assert set(logged) >= {"val/islands_ari_L0", "val/islands_ari_L1", "val/islands_ari_L2"}
    with caplog.at_level(logging.WARNING):
        assert callback.score_batch("val", levels, [torch.zeros(9, 3, 16, 16, dtype=torch.bool)] * 3) == 0
    assert callback.log_gathered_scores(Trainer(), Module(), "val") == {}
    assert "9 points but the model 4 columns" in caplog.text
    assert not (tmp_path / "figs").exists()  # plot=False draws nothing


def test_non_finite_levels_are_not_scored():
    """A diverging run's NaN columns reach validation: they are left out (the divergence check reports them), not
    handed to scipy, which refuses them ("The condensed distance matrix must contain only finite values")."""
    callback = IslandsCallback(max_scored_images=4)
    levels = torch.randn(2, 4, 3, 8)
    levels[0, 2, 1, 3] = float("nan")
    masks = [torch.rand(4, 3, 16, 16) > 0.5, torch.rand(4, 3, 16, 16) > 0.5]
    assert callback.score_batch("val", levels, masks, torch.tensor([5, 6])) == 1
    assert [index for index, _ in callback._scored["val"]] == [6]


def test_checkpoints_from_before_the_callback_still_load():
    """Their hyper-parameters carry plot_islands/plot_every: accepted, ignored, not saved again."""
    module = AgglomeratorLitModule(model=TINY_MODEL, plot_islands=True, plot_every=7)
    assert "plot_islands" not in module.hparams and "plot_every" not in module.hparams
