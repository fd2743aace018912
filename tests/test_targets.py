"""The sam_distill targets (normalisation, PCA reduction) and distill_r2, against direct computations."""

import json

import numpy as np
import pytest
import torch
from fakes import TINY_FLAGS
from test_main import data_dir, run_main  # noqa: F401  (fixture)

from partwhole.agglomerator.targets import DistillR2, TargetSpace
from partwhole.common.errors import SettingError

WEIGHTS = (0.1, 0.2, 0.7)


def low_rank_embeds(images=40, n=6, levels=3, dim=16, rank=4, seed=0) -> np.ndarray:
    """Embeddings whose per-image, per-column variation lies mostly in ``rank`` directions, plus a little noise."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, dim))
    codes = rng.standard_normal((images, n, levels, rank)) * np.array([4.0, 2.0, 1.0, 0.5])[:rank]
    return (codes @ basis + 3.0 + 0.05 * rng.standard_normal((images, n, levels, dim))).astype("float32")


def r2_of(space: TargetSpace, prediction: torch.Tensor, embeds: torch.Tensor) -> dict:
    metric = DistillR2(embeds.shape[2], WEIGHTS)
    metric.update(space.errors(prediction, space(embeds), space.constants(embeds)))
    return {k: float(v) for k, v in metric.compute().items()}


@pytest.mark.parametrize("norm", ["dataset", "none", "layer"])
def test_mean_predictor_scores_zero_and_a_perfect_one_scores_one(norm):
    embeds = torch.from_numpy(low_rank_embeds())
    space = TargetSpace(16, 6, 3, norm=norm)
    space.fit(embeds)
    mean_prediction = space.column_mean.expand_as(embeds)
    assert abs(r2_of(space, mean_prediction, embeds)["distill_r2"]) < 1e-6
    perfect = r2_of(space, space.normalise(embeds), embeds)
    assert perfect["distill_r2"] == pytest.approx(1.0) and perfect["distill_r2_l2"] == pytest.approx(1.0)
    half = r2_of(space, (space.normalise(embeds) + mean_prediction) / 2, embeds)
    assert half["distill_r2"] == pytest.approx(0.75, abs=1e-5)  # half the error: a quarter of the squared error


def test_layer_norm_whitens_each_target_on_its_own():
    """--teacher_norm=layer: every target vector gets mean 0 and variance 1 over its D, whatever its scale,
    with no statistics fitted (a target's normalisation does not depend on the other images)."""
    embeds = torch.from_numpy(low_rank_embeds())
    space = TargetSpace(16, 6, 3, norm="layer")
    space.fit(embeds)
    z = space.normalise(embeds[:3] * 7 - 2)  # scaled and shifted: the same normalised targets
    torch.testing.assert_close(z, space.normalise(embeds[:3]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z.mean(-1), torch.zeros(z.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(z.shape[:-1]), atol=1e-3, rtol=0)
    assert torch.equal(space.mean, torch.zeros(16)) and torch.equal(space.std, torch.ones(16))


def test_image_mean_r2_is_the_share_of_the_targets_shared_by_an_images_columns():
    rng = np.random.default_rng(1)
    per_image = rng.standard_normal((50, 1, 3, 8)) * 3  # what all columns of an image share
    per_column = rng.standard_normal((50, 6, 3, 8))
    embeds = torch.from_numpy((per_image + per_column).astype("float32"))
    space = TargetSpace(8, 6, 3, norm="none")
    space.fit(embeds)
    share = r2_of(space, space.column_mean.expand_as(embeds), embeds)["image_mean_r2"]
    assert 0.85 < share < 0.95  # 9 / (9 + 1) of the variance is image-level (up to sampling)


def test_reduction_keeps_the_leading_axes_and_counts_the_rest_as_error():
    embeds = torch.from_numpy(low_rank_embeds())
    full, reduced = TargetSpace(16, 6, 3), TargetSpace(16, 6, 3, target_dim=4)
    full.fit(embeds)
    reduced.fit(embeds)
    torch.testing.assert_close(reduced.components @ reduced.components.T, torch.eye(4), atol=1e-5, rtol=0)
    assert reduced.explained.sum() > 0.95 and (reduced.explained.diff() <= 1e-7).all()  # sorted, nearly all kept
    z = reduced.normalise(embeds)
    codes = reduced.reduce(z)
    assert codes.shape == (40, 6, 3, 4)
    # A k-dim prediction is scored in the full D: exactly the error of its reconstruction.
    prediction = codes + 0.3 * torch.randn_like(codes)
    back = prediction @ reduced.components + reduced.center
    direct = (back - z).square().sum(dim=(0, 1, 3))
    torch.testing.assert_close(reduced.errors(prediction, codes, reduced.constants(embeds))["student"], direct, rtol=1e-4, atol=1e-3)
    # The perfect k-dim prediction reaches the kept share of the variance around the mean predictor, no more.
    best = r2_of(reduced, codes, embeds)["distill_r2"]
    assert 0.9 < best < 1.0
    # k = D changes nothing but the basis.
    same = TargetSpace(16, 6, 3, target_dim=16)
    same.fit(embeds)
    prediction = torch.randn(40, 6, 3, 16)
    torch.testing.assert_close(same.errors((prediction - same.center) @ same.components.T, same(embeds), same.constants(embeds))["student"],
                               full.errors(prediction, full(embeds), full.constants(embeds))["student"], rtol=1e-4, atol=1e-2)


def test_bad_target_dim_is_refused():
    with pytest.raises(SettingError, match="target_dim=20"):
        TargetSpace(16, 6, 3, target_dim=20)


def test_old_checkpoints_without_the_mean_predictor_still_load():
    """Checkpoints of dbf005d kept teacher_mean/teacher_std and no mean predictor: they load, with no R² logged."""
    from partwhole.agglomerator.lit_module import AgglomeratorLitModule

    model = dict(image_size=32, conv_image_size=8, patch_size=4, patch_dim=32, levels=3)
    new = AgglomeratorLitModule(model=model, teacher_norm="dataset")
    state = {k: v for k, v in new.state_dict().items() if not k.startswith("targets.")}
    state["teacher_mean"], state["teacher_std"] = torch.full((32,), 2.0), torch.full((32,), 3.0)
    old = AgglomeratorLitModule(model=model, teacher_norm="dataset")
    old.load_state_dict(state)
    assert float(old.targets.mean[0]) == 2.0 and float(old.targets.std[0]) == 3.0 and not old.objective.targets_fitted
    assert new.objective.targets_fitted


@pytest.mark.slow
def test_cli_logs_distill_r2_with_a_reduction_and_the_checkpoint_carries_it(data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "pre"
    run_main(*TINY_FLAGS, f"--data_dir={data_dir}", "--max_epochs=2", "--levels_encoder", "--levels_encoder_dim=8",
             "--target_dim=8", "--teacher_norm=dataset", "--embeds_in_memory", "--keep_checkpoints_at=1,2",
             f"--output_dir={out}")
    results = json.loads((out / "results.json").read_text())
    for key in ("test/distill_r2", "test/image_mean_r2", "test/distill_r2_l0", "test/distill_r2_l2"):
        assert np.isfinite(results["test"][key]), key
    assert results["test"]["test/distill_r2"] < 1
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["targets.components"].shape == (8, 32) and state["targets.column_mean"].shape == (4, 3, 32)
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch-*.ckpt")) == ["epoch-001.ckpt", "epoch-002.ckpt"]
    first = torch.load(out / "checkpoints" / "epoch-001.ckpt", weights_only=True)
    assert first["epoch"] == 0 and first["state_dict"]["model.init_levels"].ne(state["model.init_levels"]).any()
    # The same test split through --mode test gives the same R² (the statistics come from the checkpoint).
    test = run_main(*TINY_FLAGS, f"--data_dir={data_dir}", "--mode=test", f"--load_checkpoint_dir={results['best']}",
                    f"--output_dir={tmp_path / 'test'}")
    again = json.loads((tmp_path / "test" / "results.json").read_text())["test"]
    assert again["test/distill_r2"] == pytest.approx(results["test"]["test/distill_r2"], abs=1e-5), test.stdout[-500:]
    fine = run_main(*TINY_FLAGS, f"--data_dir={data_dir}", "--max_epochs=1", "--supervise", "--resume_training",
                    f"--load_checkpoint_dir={out / 'checkpoints' / 'epoch-001.ckpt'}", "--levels_encoder", "--levels_encoder_dim=8",
                    f"--output_dir={tmp_path / 'fine'}")
    assert "test/accuracy=" in fine.stdout


@pytest.mark.slow
def test_target_dim_must_match_what_the_model_outputs(data_dir, tmp_path):  # noqa: F811
    proc = run_main(*TINY_FLAGS, f"--data_dir={data_dir}", "--max_epochs=1", "--target_dim=8", f"--output_dir={tmp_path}",
                    expect_ok=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and line.startswith("error: --target_dim=8: ") and "set levels_encoder_dim=8" in line, line


@pytest.mark.slow
def test_bad_keep_checkpoints_at_is_one_line(data_dir, tmp_path):  # noqa: F811
    proc = run_main(*TINY_FLAGS, f"--data_dir={data_dir}", "--max_epochs=1", "--keep_checkpoints_at=ten",
                    f"--output_dir={tmp_path}", expect_ok=False)
    assert proc.returncode != 0 and "--keep_checkpoints_at=ten" in proc.stderr.strip().splitlines()[-1]
