"""The Agglomerator: reference state-dict compatibility, same maths as the reference, objectives learn."""

import json
from pathlib import Path

import pytest
import torch
from reference_agglomerator import ReferenceAgglomerator, reference_levels_loss  # noqa: E402

from partwhole.agglomerator.lit_module import (
    AgglomeratorLitModule,
    load_backbone_weights,
    one_cycle_factor,
)
from partwhole.agglomerator.model import Agglomerator, AgglomeratorConfig
from partwhole.agglomerator.objectives import levels_distill_loss, supcon_loss
from partwhole.common.errors import SettingError

REFERENCE_JSON = Path(__file__).resolve().parents[2] / "shared" / "reference" / "reference_state_dict_IMAGENETTE.json"
TINY = dict(image_size=32, conv_image_size=8, patch_size=2, patch_dim=16, levels=3, n_classes=4)


@pytest.mark.parametrize("levels_encoder", [False, True])
def test_state_dict_matches_reference_imagenette(levels_encoder):
    if not REFERENCE_JSON.is_file():
        pytest.skip(f"{REFERENCE_JSON} not present")
    expected = json.loads(REFERENCE_JSON.read_text())[f"levels_encoder={levels_encoder}"]
    model = Agglomerator(AgglomeratorConfig(levels_encoder=levels_encoder))  # config_IMAGENETTE.cfg sizes
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("levels_encoder", [False, True])
def test_forward_equals_reference_maths(levels_encoder):
    torch.manual_seed(0)
    config = AgglomeratorConfig(**TINY, levels_encoder=levels_encoder, levels_encoder_dim=8)
    ours, ref = Agglomerator(config).double().eval(), ReferenceAgglomerator(config).double().eval()
    ref.load_state_dict(ours.state_dict())
    image = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    out = ours(image)
    ref_top, ref_levels, ref_encoded = ref(image)
    torch.testing.assert_close(out.top_level, ref_top, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.levels, ref_levels, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.encoded, ref_encoded, rtol=1e-5, atol=1e-7)
    embeds = torch.randn_like(out.encoded)
    torch.testing.assert_close(levels_distill_loss(out.encoded, embeds), reference_levels_loss(ref_encoded, embeds).float(),
                               rtol=1e-5, atol=1e-6)


def test_shapes_and_finite():
    config = AgglomeratorConfig(**TINY, iters=3, denoise_iter=1)
    model = Agglomerator(config)
    out = model(torch.randn(2, 3, 32, 32))
    n = config.num_patches
    assert out.top_level.shape == (2, n, 16)
    assert out.levels.shape == (2, n, 3, 16)
    assert out.encoded.shape == (2, n, 3, 16)
    assert model.classify(out.top_level).shape == (2, 4)
    assert out.iterations is None  # only on request
    for tensor in (out.top_level, out.levels, out.encoded):
        assert torch.isfinite(tensor).all()


def test_iterations_hold_every_state_initial_first():
    torch.manual_seed(0)
    config = AgglomeratorConfig(**TINY, iters=4)
    model = Agglomerator(config).eval()
    image = torch.randn(2, 3, 32, 32)
    plain = model(image)
    out = model(image, return_iterations=True)
    n = config.num_patches
    assert out.iterations.shape == (2, 5, n, 3, 16)
    torch.testing.assert_close(out.iterations[:, -1], plain.levels)
    torch.testing.assert_close(out.levels, plain.levels)
    torch.testing.assert_close(out.iterations[:, 0], model.init_levels.expand(2, n, 3, 16))  # every column starts alike
    # Each state is one more iteration started from the one before.
    one_more = Agglomerator(AgglomeratorConfig(**TINY, iters=1)).eval()
    one_more.load_state_dict(model.state_dict())
    torch.testing.assert_close(one_more(image, levels=out.iterations[:, 2]).levels, out.iterations[:, 3])


@pytest.mark.parametrize("bad, setting", [
    (dict(conv_image_size=7), "conv_image_size"),
    (dict(patch_size=3), "patch_size"),
    (dict(levels=1), "levels"),
    (dict(patch_dim=6), "patch_dim"),
    (dict(iters=0), "iters"),
    (dict(denoise_iter=9), "denoise_iter"),
])
def test_inconsistent_config_names_the_field(bad, setting):
    with pytest.raises(SettingError) as caught:
        AgglomeratorConfig(**{**TINY, **bad}).validate()
    assert caught.value.setting == setting and caught.value.value == bad[setting]
    assert "--" not in str(caught.value)  # the command line names its flag (partwhole_cli.user_error)


def _overfit(objective, steps=30):
    torch.manual_seed(0)
    module = AgglomeratorLitModule(model=TINY, objective=objective, learning_rate=3e-3, optimizer="adamw",
                                   weight_decay=0.0, scheduler="constant", finetune_backbone=objective == "classify")
    optimizer = module.configure_optimizers()
    module.log = lambda *a, **k: None  # no trainer attached
    labels = torch.tensor([0, 1, 2, 3])
    if objective == "supcon":
        batch = {"image": torch.randn(4, 2, 3, 32, 32), "label": labels}
    else:
        batch = {"image": torch.randn(4, 3, 32, 32), "label": labels, "embeds": torch.randn(4, 16, 3, 16)}
    losses = []
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = module.shared_step(batch, "train")["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("objective", ["sam_distill", "supcon", "classify"])
def test_each_objective_loss_falls_on_a_fixed_batch(objective):
    losses = _overfit(objective, steps=60 if objective == "sam_distill" else 30)
    assert losses[-1] < 0.7 * losses[0], losses


def test_distill_losses_against_direct_formulas():
    """--distill_loss: each kind is the level-weighted mean of its textbook formula, 0 for a perfect student."""
    a, b = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8) * 3
    weights = (0.1, 0.2, 0.7)
    w = torch.tensor(weights)
    diff = a - b
    huber = torch.where(diff.abs() < 1, 0.5 * diff.square(), diff.abs() - 0.5)
    cosine = 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    expected = {"mse": diff.square().mean(dim=(0, 1, 3)), "smooth_l1": huber.mean(dim=(0, 1, 3)), "cosine": cosine.mean(dim=(0, 1))}
    for kind, per_level in expected.items():
        torch.testing.assert_close(levels_distill_loss(a, b, weights, kind), (per_level * w).sum())
        assert abs(float(levels_distill_loss(a, a, weights, kind))) < 1e-6
    assert float(levels_distill_loss(a, 5 * a, weights, "cosine")) < 1e-6 < float(levels_distill_loss(a, 5 * a, weights, "mse"))
    with pytest.raises(SettingError, match="distill_loss='l3'"):
        levels_distill_loss(a, b, weights, "l3")


def test_supcon_loss_prefers_aligned_views():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    aligned = torch.stack([a, a], dim=1)
    random = torch.nn.functional.normalize(torch.randn(8, 2, 16), dim=2)
    assert supcon_loss(aligned) < supcon_loss(random)


def test_frozen_backbone_only_trains_the_head():
    module = AgglomeratorLitModule(model=TINY, objective="classify")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.classification_head_from_last_level.") for n in trainable)
    module.train()
    assert not module.model.image_to_tokens.training  # BatchNorm statistics stay the pretrained ones


def test_reference_style_checkpoint_loads_for_finetuning(tmp_path):
    pretrained = Agglomerator(AgglomeratorConfig(**TINY))
    path = tmp_path / "reference.ckpt"
    # Reference checkpoints: weights under state_dict, no prefix, no hyper-parameters (heads may be absent).
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("classification_head")}
    torch.save({"state_dict": state, "epoch": 3}, path)
    module = AgglomeratorLitModule(model=TINY, objective="classify")
    load_backbone_weights(module, path)
    torch.testing.assert_close(module.model.init_levels, pretrained.init_levels)
    torch.testing.assert_close(module.model.bottom_up.net[2].weight, pretrained.bottom_up.net[2].weight)


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    other = Agglomerator(AgglomeratorConfig(**{**TINY, "patch_dim": 32}))
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    module = AgglomeratorLitModule(model=TINY, objective="classify")
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone_weights(module, path)


def test_one_cycle_schedule_warms_up_then_anneals():
    total = 100
    values = [one_cycle_factor(s, total) for s in range(total + 5)]
    peak = max(values)
    assert values[0] == pytest.approx(1 / 25)
    assert peak == pytest.approx(1.0)
    assert values.index(peak) == 30
    assert values[-1] == pytest.approx(1 / 25e4)


def test_levels_encoder_norm_over_columns_erases_what_an_image_s_columns_share():
    """LayerNorm over the columns (the reference) makes the column-mean of the encoder's output the same for
    every image; over the features it is not (what the toy study found the distillation losing)."""
    from partwhole.agglomerator.model import Agglomerator, AgglomeratorConfig

    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    spread = {}
    for norm in ("columns", "features"):
        config = AgglomeratorConfig(image_size=32, conv_image_size=8, patch_size=2, patch_dim=32, levels=3,
                                    levels_encoder=True, levels_encoder_dim=16, levels_encoder_norm=norm)
        with torch.no_grad():
            encoded = Agglomerator(config)(images).encoded  # (b, n, l, D)
        spread[norm] = float(encoded.mean(1).std(0).mean())  # how much the per-image column-mean differs between images
        assert float(encoded.std(1).mean()) > 0.1  # columns of one image still differ
    assert spread["columns"] < 1e-5 < 1e-2 < spread["features"]


@pytest.mark.parametrize("reverse_groups", [False, True])
def test_features_norm_layout_computes_the_per_column_layer_norm_net(reverse_groups):
    """ColumnNet(norm="features") in its (g, b*n, d) layout equals the per-column maths written out directly."""
    from partwhole.agglomerator.model import ColumnNet

    torch.manual_seed(0)
    net = ColumnNet(8, 3, 5, hidden_layers=2, out_dim=6, norm="features")
    for p in net.parameters():
        p.data.normal_()
    x = torch.randn(3, 8, 2, 5)  # (g, d, b, n)
    expected = []
    for level in range(3):
        group = 2 - level if reverse_groups else level
        h = x[level].permute(1, 2, 0)  # (b, n, d)
        for layer in list(net.net)[1:]:
            if isinstance(layer, torch.nn.LayerNorm):
                h = torch.nn.functional.layer_norm(h, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
            elif isinstance(layer, torch.nn.Conv1d):
                out = layer.out_channels // 3
                w = layer.weight.view(3, out, -1)[group]
                h = h @ w.T + layer.bias.view(3, out)[group]
            else:
                h = layer(h)
        expected.append(h.permute(2, 0, 1))  # (d_out, b, n)
    torch.testing.assert_close(net(x, reverse_groups=reverse_groups), torch.stack(expected), rtol=1e-5, atol=1e-5)
