"""CUDA checks (skipped without a GPU): the fast paths agree with their CPU/fp32 selves on a GPU."""

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_agglomerator_bf16_on_gpu_matches_fp32_cpu():
    from agglomerator.model import Agglomerator, AgglomeratorConfig
    from agglomerator.objectives import levels_distill_loss

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
    from hierarchical_masks.sam_points import PointGridMasker, build_sam

    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    masks = {}
    for device in ("cpu", "cuda"):
        sam = build_sam("vit_tiny").to(device)
        masker = PointGridMasker(sam, img_size=64, patch_size=16, precision="fp32")
        masks[device] = masker([image]).cpu().numpy()
    inter = (masks["cpu"] & masks["cuda"]).sum(axis=(-1, -2))
    union = (masks["cpu"] | masks["cuda"]).sum(axis=(-1, -2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    assert iou.min() >= 0.99


def test_stage2_fast_path_on_gpu_matches_cpu():
    import timm

    from hierarchical_masks.mask_embedding import MaskedImageEncoder

    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False, num_classes=0).eval()
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    masks = torch.rand(4, 3, 32, 32) > 0.5
    cpu = MaskedImageEncoder(model, device="cpu", precision="fp32").embed(image, masks)
    gpu = MaskedImageEncoder(model, device="cuda", precision="bf16").embed(image, masks)
    a, b = torch.from_numpy(cpu).flatten(0, 1), torch.from_numpy(gpu).flatten(0, 1)
    assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.99
