"""SAM 2.1 masks for a grid of single-point prompts, batched (stage 1 with the SAM 2.1 teacher).

Based on the ``sam2`` package (facebookresearch/sam2): its model configs,
``build_sam2``, Hiera image encoder, prompt encoder and mask decoder are used
as they are. What this module adds, mirroring ``sam_points.py`` for SAM 1:

* :data:`SAM2_CONFIGS`: ``--sam_model_type`` names -> sam2's own config files,
  plus ``sam2.1_hiera_test``, the Hiera-T config made small (256 px in, narrow
  and shallow) through hydra overrides, for tests and CPU smoke runs;
* :func:`build_sam2_model`: random weights drawn from a seed, or a checkpoint
  read with ``weights_only=True``, with one-line errors for a missing or
  mismatching file;
* :class:`Sam2PointGridMasker`: the point prompts encoded once, one
  image-encoder forward per batch of images, then every grid point of an
  image as its own single-point prompt through the mask decoder in one (or a
  few chunked) calls, three masks per point.

The masks equal what ``SAM2ImagePredictor.predict`` (default settings) gives
one point at a time on the same image: the same input transform
(``SAM2Transforms``: to [0, 1], resize to a square ``image_size``, ImageNet
normalisation), the same coordinate normalisation (``x / w * image_size``),
the same features (the decoder's high-res projections, ``no_mem_embed`` added
to the top level), the same decoder call, and the same single bilinear resize
of the 4x-upscaled low-resolution logits to the image size, thresholded at 0.
The predictor's optional hole and sprinkle removal (``max_hole_area``,
``max_sprinkle_area``, both 0 by default) is not applied.

``sam2`` is imported only when a SAM 2.1 model is built, so SAM 1 runs where
the package is not installed (e.g. the offline GPU machine of
``bench/gpu_suite.sh``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from hierarchical_masks.point_grid import patch_grid_points
from hierarchical_masks.devices import PRECISIONS
from hierarchical_masks.sam_points import GridMasker, check_choice, load_state_dict_file, require_checkpoint_file

log = logging.getLogger(__name__)

_CHECKPOINT_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
# --sam_model_type -> (sam2's config file, checkpoint URL); the configs ship inside the sam2 package
SAM2_CONFIGS = {
    "sam2.1_hiera_tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", f"{_CHECKPOINT_BASE}/sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_small": ("configs/sam2.1/sam2.1_hiera_s.yaml", f"{_CHECKPOINT_BASE}/sam2.1_hiera_small.pt"),
    "sam2.1_hiera_base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", f"{_CHECKPOINT_BASE}/sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_large": ("configs/sam2.1/sam2.1_hiera_l.yaml", f"{_CHECKPOINT_BASE}/sam2.1_hiera_large.pt"),
    "sam2.1_hiera_test": ("configs/sam2.1/sam2.1_hiera_t.yaml", None),
}
# sam2.1_hiera_test: Hiera-T's structure at a quarter of its input side (256 px in, 16 x 16 top
# features, 64 x 64 low-res masks), 32 channels in the first stage, one block per stage (two in the
# third), a 64-wide decoder: every transform, feature level and decoder step runs for real in
# a fraction of a second per image on a CPU
TEST_MODEL_OVERRIDES = [
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.d_model=64",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
]
# the trunk's first width and block count tell the released models apart
_MODEL_OF_TRUNK = {(96, 12): "sam2.1_hiera_tiny", (96, 16): "sam2.1_hiera_small", (112, 24): "sam2.1_hiera_base_plus",
                   (144, 48): "sam2.1_hiera_large", (32, 5): "sam2.1_hiera_test"}


def is_sam2_model(model_type: str) -> bool:
    """Whether ``--sam_model_type`` names a SAM 2.1 model (else it is a SAM 1 one)."""
    return model_type in SAM2_CONFIGS


def sam2_model_type_of(state_dict: dict) -> str | None:
    """Guess which SAM 2.1 model a state dict (or a ``{'model': state_dict}`` file) belongs to."""
    state_dict = state_dict.get("model", state_dict)
    patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight") if isinstance(state_dict, dict) else None
    if not isinstance(patch, torch.Tensor):
        return None
    blocks = {key.split(".")[3] for key in state_dict if key.startswith("image_encoder.trunk.blocks.")}
    return _MODEL_OF_TRUNK.get((int(patch.shape[0]), len(blocks)))


def require_sam2_checkpoint_file(checkpoint: str | os.PathLike, model_type: str) -> Path:
    """``checkpoint`` as a path; a missing file is an error that says where to download it."""
    return require_checkpoint_file(checkpoint, model_type, url=SAM2_CONFIGS[model_type][1])


def load_sam2_checkpoint(model: torch.nn.Module, checkpoint: str | os.PathLike, model_type: str) -> None:
    """Load a SAM 2.1 checkpoint (``{'model': state_dict}``, as released, or a bare state dict) into ``model``.

    Read with ``weights_only=True``. Raises :class:`InputError` (one line naming the
    flag and the fix) for a missing or unreadable file or one of another model.
    """
    path = require_sam2_checkpoint_file(checkpoint, model_type)
    load_state_dict_file(model, path, checkpoint, model_type, kind="SAM 2.1", published=".pt file")


def build_sam2_model(model_type: str, checkpoint: str | os.PathLike | None = None, *, seed: int = 0) -> torch.nn.Module:
    """A SAM 2.1 model (``sam2.modeling.sam2_base.SAM2Base``) in eval mode, on the CPU.

    Built by ``sam2.build_sam.build_sam2`` from the package's own config
    (``sam2.1_hiera_test``: Hiera-T's made small, see :data:`TEST_MODEL_OVERRIDES`).
    ``checkpoint=None`` gives random weights (a warning says so), drawn from
    ``seed`` so every run and every rank gets the same model.
    """
    check_choice("sam_model_type", model_type, SAM2_CONFIGS)
    from sam2.build_sam import build_sam2

    config, _ = SAM2_CONFIGS[model_type]
    overrides = TEST_MODEL_OVERRIDES if model_type == "sam2.1_hiera_test" else []
    if checkpoint is not None:
        require_sam2_checkpoint_file(checkpoint, model_type)  # before the build: a typo costs no time
    else:
        log.warning("SAM 2.1 %s has random weights (no --sam_checkpoint): masks are only good for tests and timing", model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2(config, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=list(overrides))
    if checkpoint is not None:
        load_sam2_checkpoint(model, checkpoint, model_type)
    return model.eval()


class Sam2PointGridMasker(GridMasker):
    """Masks of a SAM 2.1 model for every patch-centre point of ``img_size`` images.

    The same interface as ``sam_points.PointGridMasker``: call with uint8 RGB
    images ``(b, img_size, img_size, 3)`` (or a list of them), get bool masks
    ``(b, k, 3, img_size, img_size)`` on the model's device: for point ``k``, the
    decoder's three multimask outputs in its order (mask tokens 1, 2, 3, as SAM 1).

    Args:
        model: a ``SAM2Base`` in eval mode, already on its device.
        img_size, patch_size: image side and patch side (one point per patch).
        precision: ``'fp32'``, ``'bf16'`` or ``'fp16'`` (autocast of the image
            encoder and mask decoder; prompts, the logit resize and the threshold
            stay fp32).
        points_per_batch: prompts per mask-decoder call (bounds memory: each
            prompt gets its own copy of the image features in the decoder).
    """

    mask_threshold = 0.0  # SAM2ImagePredictor's default

    def __init__(self, model: torch.nn.Module, *, img_size: int = 224, patch_size: int = 16, precision: str = "fp32",
                 points_per_batch: int = 256):
        check_choice("precision", precision, PRECISIONS)
        self.sam, self.img_size, self.precision = model, img_size, precision
        self.points_per_batch = max(1, points_per_batch)
        device = model.device
        # SAM2Transforms' ImageNet normalisation of [0, 1] pixels
        self.pixel_mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
        points = torch.as_tensor(patch_grid_points(img_size, patch_size), dtype=torch.float)  # (k, 2) xy in image pixels
        coords = (points / img_size * model.image_size).to(device)[:, None, :]  # (k, 1, 2), SAM2Transforms.transform_coords
        labels = torch.ones(len(points), 1, dtype=torch.int, device=device)  # (k, 1): one foreground point each
        with torch.inference_mode():
            self.sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)  # (k, 2, c)
            self.dense = dense[:1]  # the no-mask embedding, the same for every prompt: (1, c, h, w)
            self.image_pe = model.sam_prompt_encoder.get_dense_pe()  # (1, c, h, w)

    def model_input(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``(img_size, img_size, 3)`` -> uint8 ``(3, img_size, img_size)`` (resized on the device, batched)."""
        return np.ascontiguousarray(self.checked_image(image).transpose(2, 0, 1))

    @torch.inference_mode()
    def predict_model_inputs(self, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Masks for a batch of :meth:`model_input` outputs ``(b, 3, img_size, img_size)`` uint8."""
        model = self.sam
        inputs = torch.as_tensor(inputs).to(model.device, non_blocking=True)
        # SAM2Transforms: ToTensor, torchvision's Resize((S, S)) of a tensor (bilinear, antialiased), Normalize
        size = (model.image_size, model.image_size)
        images = F.interpolate(inputs.float() / 255, size, mode="bilinear", align_corners=False, antialias=True)
        images = (images - self.pixel_mean) / self.pixel_std  # (b, 3, S, S)
        with self._autocast():
            features = model.forward_image(images)["backbone_fpn"][-model.num_feature_levels :]  # fine to coarse
        # SAM2ImagePredictor.set_image: the top level gets the "no memory" embedding
        top = features[-1] + model.no_mem_embed.view(1, -1, 1, 1) if model.directly_add_no_mem_embed else features[-1]
        high_res = features[:-1]  # already through the decoder's conv_s0 / conv_s1 (SAM2Base.forward_image)
        return torch.stack([self._masks_of_image(top[i : i + 1], [f[i : i + 1] for f in high_res]) for i in range(len(top))])

    def _masks_of_image(self, embedding: torch.Tensor, high_res: list[torch.Tensor]) -> torch.Tensor:
        """All points of one image: ``(1, c, h, w)`` features -> bool ``(k, 3, H, W)``."""
        chunks = []
        for start in range(0, self.num_points, self.points_per_batch):
            with self._autocast():
                low_res, _, _, _ = self.sam.sam_mask_decoder(
                    image_embeddings=embedding,
                    image_pe=self.image_pe,
                    sparse_prompt_embeddings=self.sparse[start : start + self.points_per_batch],
                    dense_prompt_embeddings=self.dense,
                    multimask_output=True,
                    repeat_image=True,  # every prompt sees the same image
                    high_res_features=high_res,
                )  # (k, 3, 4h, 4w) logits
            logits = F.interpolate(low_res.float(), (self.img_size, self.img_size), mode="bilinear", align_corners=False)
            chunks.append(logits > self.mask_threshold)
        return torch.cat(chunks)
