"""SAM's image-encoder attention through SDPA, and the compiled encoder: same encoder outputs, same masks.

The reference is segment_anything's own ``Attention.forward``. Random-weight
SAMs start with all-zero relative-position tables (``rel_pos_zero_init``), which
would hide a wrong bias, so every model here gets random tables first.
"""

from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention
from stage1 import run_stage1

from partwhole.common.errors import InputError
from partwhole.common.mask_io import load_masks
from partwhole.masks.masker_options import MaskerOptions
from partwhole.masks.sam_attention import SDPAAttention, attention_of, set_attention
from partwhole.masks.sam_points import PointGridMasker
from partwhole.masks.teachers import build_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_rel_pos(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every relative-position table with noise of the size trained SAMs have (a zero table tests nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, Attention) and m.use_rel_pos:
                for table in (m.rel_pos_h, m.rel_pos_w):
                    table.copy_(torch.randn(table.shape, generator=generator) * 0.5)
    return module


def images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``(count, size, size, 3)`` uint8: flat background, a few bright rectangles (something for SAM to cut)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    for image in out:
        image[:] = rng.integers(0, 60, 3)
        for _ in range(3):
            y, x = rng.integers(0, size - size // 4, 2)
            image[y : y + rng.integers(size // 8, size // 2), x : x + rng.integers(size // 8, size // 2)] = rng.integers(0, 256, 3)
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def masks_with(sam, attention: str, batch: np.ndarray, **masker_kwargs) -> np.ndarray:
    set_attention(sam, attention)
    masker = PointGridMasker(sam, MaskerOptions(img_size=batch.shape[1], patch_size=16, **masker_kwargs))
    return masker(batch).numpy()


def test_sdpa_encoder_equals_reference_windowed_padded_and_global():
    # a 16x16 token grid with 6x6 windows: windows are padded (16 -> 18), as vit_h's 64 -> 70 with 14x14 windows
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=128, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2, out_chans=16,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=6, global_attn_indexes=(1,),
    ).eval()
    random_rel_pos(encoder)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        reference = encoder(x)
        assert attention_of(set_attention(encoder, "sdpa")) == "sdpa"
        assert all(type(b.attn) is SDPAAttention for b in encoder.blocks)
        fast = encoder(x)
        assert attention_of(set_attention(encoder, "reference")) == "reference"
        again = encoder(x)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, reference)  # the swap is undone exactly
    assert encoder.state_dict().keys() == state.keys() and all(torch.equal(encoder.state_dict()[k], v) for k, v in state.items())


def test_build_sam_defaults_to_sdpa_and_checks_the_choice():
    assert attention_of(build_teacher("vit_tiny")) == "sdpa"
    assert attention_of(build_teacher("vit_tiny", attention="reference")) == "reference"
    assert attention_of(build_teacher("vit_tiny").mask_decoder) is None  # the decoder's attention is another class
    with pytest.raises(InputError, match="^attention='flash': unknown; choose one of reference, sdpa"):
        build_teacher("vit_tiny", attention="flash")


def test_sdpa_masks_equal_reference_attention_vit_tiny():
    sam = random_rel_pos(build_teacher("vit_tiny"))
    batch = images(2, 64)
    iou = mask_iou(masks_with(sam, "reference", batch), masks_with(sam, "sdpa", batch))
    assert iou.min() >= 0.99, f"IoU min {iou.min():.4f}"


def test_compiled_encoder_traces_pads_the_short_batch_and_gives_the_same_masks():
    # backend "eager": dynamo traces the encoder (graph breaks, guards, the padding) in seconds on a CPU;
    # inductor's code generation is checked by the slow test below and on a GPU in test_gpu.py
    sam = random_rel_pos(build_teacher("vit_tiny"))
    batch = images(3, 64)
    expected = masks_with(sam, "reference", batch)
    set_attention(sam, "sdpa")
    masker = PointGridMasker(sam, MaskerOptions(img_size=64, patch_size=16, compile_encoder=True),
                             compile_options={"backend": "eager", "fullgraph": True})
    got = np.concatenate([masker(batch[:2]).numpy(), masker(batch[2:]).numpy()])  # 2, then 1 padded to 2
    assert masker.compiled_batch == 2
    assert mask_iou(expected, got).min() >= 0.99


def test_stage1_flags_reach_the_model(tmp_path):
    from PIL import Image

    (tmp_path / "in" / "cls").mkdir(parents=True)
    for i, image in enumerate(images(2, 96)):
        Image.fromarray(image).save(tmp_path / "in" / "cls" / f"im{i}.png")
    common = dict(in_data_path=str(tmp_path / "in"), sam_model_type="vit_tiny", sam_checkpoint=None, device="cpu",
                  img_size=64, batch_size=2, show_progress=False)
    run_stage1(out_data_path=str(tmp_path / "sdpa"), attention="sdpa", **common)
    run_stage1(out_data_path=str(tmp_path / "ref"), attention="reference", **common)
    for name in ("im0", "im1"):
        a, b = load_masks(tmp_path / "sdpa" / "cls" / f"{name}.pkl"), load_masks(tmp_path / "ref" / "cls" / f"{name}.pkl")
        assert mask_iou(a, b).min() >= 0.99
    with pytest.raises(InputError, match="^attention='fast'"):
        run_stage1(out_data_path=str(tmp_path / "bad"), attention="fast", **common)


@pytest.mark.slow
def test_inductor_compiled_encoder_gives_the_same_masks():
    sam = random_rel_pos(build_teacher("vit_tiny"))
    batch = images(3, 64)
    expected = masks_with(sam, "reference", batch)
    set_attention(sam, "sdpa")
    masker = PointGridMasker(sam, MaskerOptions(img_size=64, patch_size=16, compile_encoder=True))
    got = np.concatenate([masker(batch[:2]).numpy(), masker(batch[2:]).numpy()])
    assert mask_iou(expected, got).min() >= 0.99


@pytest.mark.slow
def test_sdpa_equals_reference_vit_b():
    """SAM ViT-B (random weights, real size: 1024 px, 64x64 tokens, 14x14 windows padded to 70, 4 global blocks)."""
    sam = random_rel_pos(build_teacher("vit_b"))
    masker = PointGridMasker(sam, MaskerOptions(img_size=224))
    x = sam.preprocess(torch.as_tensor(masker.model_input(images(1, 224)[0]))[None].float())
    with torch.inference_mode():  # one encoder forward per attention; the masks come from those embeddings
        embeddings = {attention: set_attention(sam, attention).image_encoder(x) for attention in ("reference", "sdpa")}
        masks = {attention: masker._masks_of_embedding(e).numpy() for attention, e in embeddings.items()}
    torch.testing.assert_close(embeddings["sdpa"], embeddings["reference"], rtol=1e-3, atol=1e-4)
    iou = mask_iou(masks["reference"], masks["sdpa"])
    assert iou.min() >= 0.99, f"IoU min {iou.min():.4f}"
