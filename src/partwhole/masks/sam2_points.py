"""SAM 2.1 masks for a grid of single-point prompts, batched (stage 1 with the SAM 2.1 teacher).

Based on the ``sam2`` package (facebookresearch/sam2): its model configs,
``build_sam2``, Hiera image encoder, prompt encoder and mask decoder are used
as they are. What this module adds, mirroring ``sam_points.py`` for SAM 1:

* :func:`build_sam2_model`: a model from one of sam2's own config files, with
  random weights (``teachers.py`` names the models, seeds them and loads
  checkpoints), and :data:`TEST_MODEL_OVERRIDES`, the hydra overrides that make
  Hiera-T small (256 px in, narrow and shallow: ``sam2.1_hiera_test``) for
  tests and CPU smoke runs;
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

from typing import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from partwhole.common.point_grid import patch_grid_points
from partwhole.masks.masker_options import DEFAULT_OPTIONS, MaskerOptions
from partwhole.masks.sam_points import GridMasker

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


def build_sam2_model(config: str, overrides: Sequence[str] = ()) -> torch.nn.Module:
    """A SAM 2.1 model (``sam2.modeling.sam2_base.SAM2Base``) in eval mode, on the CPU, with random weights.

    Built by ``sam2.build_sam.build_sam2`` from ``config``, one of the package's own config files
    (e.g. ``configs/sam2.1/sam2.1_hiera_l.yaml``), with hydra ``overrides`` (:data:`TEST_MODEL_OVERRIDES`
    for the test model). ``sam2`` is imported here, so SAM 1 runs without it.
    """
    from sam2.build_sam import build_sam2

    return build_sam2(config, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=list(overrides)).eval()


class Sam2PointGridMasker(GridMasker):
    """Masks of a SAM 2.1 model for every patch-centre point of ``img_size`` images.

    The same interface as ``sam_points.PointGridMasker``: call with uint8 RGB
    images ``(b, img_size, img_size, 3)`` (or a list of them), get bool masks
    ``(b, k, 3, img_size, img_size)`` on the model's device: for point ``k``, the
    decoder's three multimask outputs in its order (mask tokens 1, 2, 3, as SAM 1).

    Args:
        model: a ``SAM2Base`` in eval mode, already on its device.
        options: the grid (``img_size``, ``patch_size``: one point per patch) and the options SAM 2.1
            takes: ``precision`` (autocast of the image encoder and mask decoder; prompts, the logit
            resize and the threshold stay fp32) and ``points_per_batch`` (prompts per mask-decoder
            call: bounds memory, as each prompt gets its own copy of the image features there).
    """

    mask_threshold = 0.0  # SAM2ImagePredictor's default

    def __init__(self, model: torch.nn.Module, options: MaskerOptions = DEFAULT_OPTIONS):
        img_size = options.img_size
        self.sam, self.img_size, self.precision = model, img_size, options.precision
        self.points_per_batch = options.points_per_batch
        device = model.device
        # SAM2Transforms' ImageNet normalisation of [0, 1] pixels
        self.pixel_mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
        points = torch.as_tensor(patch_grid_points(img_size, options.patch_size), dtype=torch.float)  # (k, 2) xy in image pixels
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
