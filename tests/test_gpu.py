"""CUDA checks (skipped without a GPU): the fast paths agree with their CPU/fp32 selves on a GPU.

conftest.py hides GPUs unless CUDA_VISIBLE_DEVICES is set: run these with
``CUDA_VISIBLE_DEVICES=0 python -m pytest -m gpu`` (bench/gpu_suite.sh does).
"""

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_agglomerator_bf16_on_gpu_matches_fp32_cpu():
    from partwhole.agglomerator.model import Agglomerator, AgglomeratorConfig
    from partwhole.agglomerator.objectives import levels_distill_loss

    torch.manual_seed(0)
    config = AgglomeratorConfig(image_size=32, conv_image_size=8, patch_size=2, patch_dim=16, levels=3, iters=2)
    model = Agglomerator(config).eval()
    images, embeds = torch.randn(4, 3, 32, 32), torch.randn(4, 16, 3, 16)
    with torch.no_grad():
        expected = model(images).encoded
    gpu = model.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu(images.cuda()).encoded.float().cpu()
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1))
    assert cosine.min() > 0.98
    gpu.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = levels_distill_loss(gpu(images.cuda()).encoded, embeds.cuda())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_stage1_masks_on_gpu_match_cpu():
    from partwhole.masks.masker_options import MaskerOptions
    from partwhole.masks.sam_points import PointGridMasker
    from partwhole.masks.teachers import build_teacher

    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    masks = {}
    for device in ("cpu", "cuda"):
        sam = build_teacher("vit_tiny").to(device)
        masker = PointGridMasker(sam, MaskerOptions(img_size=64, patch_size=16, precision="fp32"))
        masks[device] = masker([image]).cpu().numpy()
    inter = (masks["cpu"] & masks["cuda"]).sum(axis=(-1, -2))
    union = (masks["cpu"] | masks["cuda"]).sum(axis=(-1, -2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    assert iou.min() >= 0.99


def test_stage2_fast_path_on_gpu_matches_cpu():
    import timm

    from partwhole.embeds.mask_embedding import MaskedImageEncoder

    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False, num_classes=0).eval()
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    masks = torch.rand(4, 3, 32, 32) > 0.5
    cpu = MaskedImageEncoder(model, device="cpu", precision="fp32").embed(image, masks)
    gpu = MaskedImageEncoder(model, device="cuda", precision="bf16").embed(image, masks)
    a, b = torch.from_numpy(cpu).flatten(0, 1), torch.from_numpy(gpu).flatten(0, 1)
    assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.99


def _random_rel_pos(sam):
    """Trained SAMs have non-zero relative-position tables; random-weight ones start at zero (which would test nothing)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, table in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                table.copy_(torch.randn(table.shape, generator=generator) * 0.5)
    return sam


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum(axis=(-1, -2))
    union = (a | b).sum(axis=(-1, -2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def test_stage1_sdpa_and_bf16_on_gpu_match_the_reference_attention_vit_b():
    """SAM ViT-B at its real size on the GPU: SDPA fp32 gives the reference's masks; bf16 + SDPA keeps mean IoU >= 0.97."""
    from partwhole.masks.masker_options import MaskerOptions
    from partwhole.masks.sam_attention import set_attention
    from partwhole.masks.sam_points import PointGridMasker
    from partwhole.masks.teachers import build_teacher

    rng = np.random.default_rng(0)
    images = (rng.random((2, 8, 8, 3)) * 255).astype(np.uint8).repeat(28, axis=1).repeat(28, axis=2)  # 224 px blocks
    sam = _random_rel_pos(build_teacher("vit_b")).cuda()
    masks = {}
    for precision, attention in (("fp32", "reference"), ("fp32", "sdpa"), ("bf16", "sdpa")):
        set_attention(sam, attention)
        masks[precision, attention] = PointGridMasker(sam, MaskerOptions(img_size=224, precision=precision))(images).cpu().numpy()
    reference = masks["fp32", "reference"]
    assert _iou(reference, masks["fp32", "sdpa"]).min() >= 0.99
    assert _iou(reference, masks["bf16", "sdpa"]).mean() >= 0.97


def test_stage1_inductor_compiled_encoder_on_gpu_gives_the_eager_masks():
    from partwhole.masks.masker_options import MaskerOptions
    from partwhole.masks.sam_points import PointGridMasker
    from partwhole.masks.teachers import build_teacher

    images = (np.random.default_rng(1).random((3, 64, 64, 3)) * 255).astype(np.uint8)
    sam = _random_rel_pos(build_teacher("vit_tiny")).cuda()
    eager = PointGridMasker(sam, MaskerOptions(img_size=64, patch_size=16))(images).cpu().numpy()
    compiled = PointGridMasker(sam, MaskerOptions(img_size=64, patch_size=16, compile_encoder=True))
    got = np.concatenate([compiled(images[:2]).cpu().numpy(), compiled(images[2:]).cpu().numpy()])  # the short batch is padded
    assert _iou(eager, got).min() >= 0.99
