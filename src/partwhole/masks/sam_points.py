"""SAM masks for a grid of single-point prompts, batched (the maths of stage 1).

Based on segment_anything (facebookresearch/segment-anything): the image
encoder, prompt encoder and mask decoder are used as they are. What this
module adds (which models there are, and how checkpoints load: ``teachers.py``):

* :func:`build_sam_vit_tiny`: a small SAM made of the same modules, for tests
  and CPU smoke runs;
* :class:`PointGridMasker`: the point prompts encoded once, one image-encoder
  forward per batch of images, then every grid point of an image as its own
  single-point prompt in one (or a few chunked) mask-decoder calls that share
  the image embedding, three masks per point; optionally with the image
  encoder under ``torch.compile`` (batches padded to one shape, so it
  compiles once).

The masks equal what ``SamPredictor.predict`` gives one point at a time on the
same image: same input resize (``ResizeLongestSide.apply_image``), same
coordinate transform, same decoder, and the same two bilinear resizes of the
low-resolution logits (256 -> 1024, crop, -> image size), folded here into one
small matrix per axis instead of materialising 1024 x 1024 logits.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import numpy as np
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch.nn import functional as F

from partwhole.common.image_folders import checked_square_image
from partwhole.common.point_grid import patch_grid_points
from partwhole.common.runtime import PRECISIONS
from partwhole.masks.masker_options import DEFAULT_OPTIONS, POINT_LABELS, MaskerOptions  # noqa: F401 (POINT_LABELS: re-exported)

# --------------------------------------------------------------------------- models


def build_sam_vit_tiny() -> Sam:
    """A small SAM made of segment_anything's own modules (for tests and CPU smoke runs).

    The real models' structure at a quarter of their input side (256 px in,
    16 x 16 embedding grid, 64 x 64 low-res masks) and a fraction of their
    widths and depths, so every resize, coordinate transform and decoder step
    runs for real in well under a second per image on a CPU. Random weights
    (``teachers.build_teacher`` loads a checkpoint into it).
    """
    embed_dim, image_size, vit_patch = 32, 256, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=vit_patch,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
            out_chans=embed_dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            window_size=8,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(image_size // vit_patch, image_size // vit_patch),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=embed_dim, mlp_dim=64, num_heads=2),
            transformer_dim=embed_dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
    )
    return sam.eval()


# --------------------------------------------------------------------------- masks


def _linear_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of ``F.interpolate(mode='bilinear', align_corners=False)`` along one axis."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in basis vectors, (n_in, 1, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T


def postprocess_matrix(low_res: int, model_size: int, input_size: int, out_size: int) -> torch.Tensor:
    """One axis of ``Sam.postprocess_masks`` as a ``(out_size, low_res)`` matrix.

    SAM upsamples logits ``low_res -> model_size``, crops the padding to
    ``input_size`` and resizes to ``out_size``; bilinear resizes are separable
    and linear, so the three steps compose into one matrix per axis.
    """
    upsample = _linear_resize_matrix(low_res, model_size)[:input_size]  # (input_size, low_res)
    return (_linear_resize_matrix(input_size, out_size) @ upsample).float()


def decode_multimask_shared_image(
    decoder: MaskDecoder, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor
) -> torch.Tensor:
    """``MaskDecoder(..., multimask_output=True)`` for ``k`` prompts on one image, without copying it ``k`` times.

    ``MaskDecoder.predict_masks`` repeats the image embedding once per prompt
    before its transformer. Every prompt sees the same image, so here the
    embedding keeps batch 1 and broadcasting in the attention matmuls and
    residual adds does the repeat: the first block's image-side projections
    are computed once instead of ``k`` times. Same modules, same weights, same
    maths.

    Args:
        decoder: SAM's mask decoder.
        image_embedding: ``(1, c, h, w)`` image embedding plus the dense
            (no-mask) prompt embedding.
        image_pe: ``(1, c, h, w)`` dense positional encoding.
        sparse_prompt_embeddings: ``(k, t, c)`` point-prompt tokens.

    Returns:
        ``(k, 3, 4h, 4w)`` low-resolution mask logits (the multimask outputs).
    """
    k = sparse_prompt_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.expand(k, -1, -1), sparse_prompt_embeddings], dim=1)
    hs, src = decoder.transformer(image_embedding, image_pe, tokens)  # src: (k, h*w, c) after the first block
    _, c, h, w = image_embedding.shape
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(k, c, h, w))  # (k, c', 4h, 4w)
    # mask token 0 is the single-mask output; multimask uses tokens 1..3
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in range(1, decoder.num_mask_tokens)], dim=1
    )  # (k, 3, c')
    return (hyper_in @ upscaled.flatten(2)).view(k, -1, *upscaled.shape[-2:])


class GridMasker:
    """What the SAM 1 and SAM 2.1 point-grid maskers share: the image check, autocast and the call.

    A subclass sets ``sam``, ``img_size``, ``precision`` and ``sparse`` (the encoded point prompts)
    and implements :meth:`model_input` and :meth:`predict_model_inputs`.
    """

    sam: torch.nn.Module
    img_size: int
    precision: str
    sparse: torch.Tensor

    @property
    def num_points(self) -> int:
        return self.sparse.shape[0]

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def checked_image(self, image: np.ndarray) -> np.ndarray:
        """``image`` as a uint8 ``(img_size, img_size, 3)`` array, or a ValueError saying what it is."""
        return checked_square_image(image, self.img_size)

    def model_input(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_model_inputs(self, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.sam.device.type, dtype=PRECISIONS[self.precision])

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """Masks ``(b, k, 3, img_size, img_size)`` bool for uint8 RGB images ``(b, img_size, img_size, 3)``."""
        return self.predict_model_inputs(np.stack([self.model_input(im) for im in images]))


class PointGridMasker(GridMasker):
    """Masks of a SAM for every patch-centre point of ``img_size`` images.

    Call with uint8 RGB images ``(b, img_size, img_size, 3)`` (or a list of
    them), get bool masks ``(b, k, 3, img_size, img_size)`` on the model's
    device: for point ``k``, SAM's three multimask outputs in SAM's order.

    Args:
        sam: a SAM in eval mode, already on its device.
        options: the grid (``img_size``, ``patch_size``, one point per patch) and the SAM options it
            takes: ``point_labels`` (``'reference'`` gives label ``k`` to point ``k``, as the reference
            code passed; SAM then gives point 0 the background embedding, point 1 the foreground one
            and every other point no label embedding), ``precision`` (autocast of SAM's forward; the
            logit resize and threshold stay fp32), ``points_per_batch`` (prompts per mask-decoder
            call: bounds memory) and ``compile_encoder``: run the image encoder through
            ``torch.compile`` (the model itself is not changed). The first batch fixes the traced
            batch size: smaller batches are padded to it and larger ones run in slices of it, so
            the encoder compiles once; the first call pays the compile time (30 s for vit_tiny on a
            2-core CPU; the GPU suite reports it for vit_h).
        compile_options: keyword arguments of ``torch.compile`` (e.g.
            ``{"mode": "max-autotune"}``, or ``{"backend": "eager"}`` to
            check the traced path quickly on a CPU).
    """

    def __init__(self, sam: Sam, options: MaskerOptions = DEFAULT_OPTIONS, *, compile_options: dict | None = None):
        img_size = options.img_size
        self.sam, self.img_size, self.precision = sam, img_size, options.precision
        self.points_per_batch = options.points_per_batch
        # dynamic=False: one static graph per input shape; padding (below) keeps it to one shape
        compile_kwargs = {"dynamic": False, **(compile_options or {})}
        self.encoder = torch.compile(sam.image_encoder, **compile_kwargs) if options.compile_encoder else sam.image_encoder
        self.compiled_batch: int | None = None  # the batch size the compiled encoder was traced with
        device = sam.device
        points = patch_grid_points(img_size, options.patch_size)  # (k, 2) xy in image pixels
        self.resize = ResizeLongestSide(sam.image_encoder.img_size)
        coords = self.resize.apply_coords(points, (img_size, img_size))  # SamPredictor's float64 transform
        coords = torch.as_tensor(coords, dtype=torch.float, device=device)[:, None, :]  # (k, 1, 2)
        labels = np.ones(len(points)) if options.point_labels == "foreground" else np.arange(len(points))
        labels = torch.as_tensor(labels, dtype=torch.int, device=device)[:, None]  # (k, 1)
        # The prompts are the same for every image: encode them once, in fp32 (the
        # Fourier positional encoding of a point loses its phase in 16-bit floats).
        with torch.inference_mode():
            self.sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)  # (k, 2, c)
            self.dense = dense[:1]  # the no-mask embedding, the same for every prompt: (1, c, h, w)
            self.image_pe = sam.prompt_encoder.get_dense_pe()  # (1, c, h, w)
        input_size = self.resize.get_preprocess_shape(img_size, img_size, self.resize.target_length)[0]
        low_res = 4 * sam.prompt_encoder.image_embedding_size[0]  # the decoder upscales 4x
        self.upsample = postprocess_matrix(low_res, sam.image_encoder.img_size, input_size, img_size).to(device)

    def model_input(self, image: np.ndarray) -> np.ndarray:
        """uint8 ``(img_size, img_size, 3)`` -> SAM's uint8 ``(3, S, S')`` input (the resize SamPredictor does)."""
        return np.ascontiguousarray(self.resize.apply_image(self.checked_image(image)).transpose(2, 0, 1))

    @torch.inference_mode()
    def predict_model_inputs(self, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Masks for a batch of :meth:`model_input` outputs ``(b, 3, S, S')`` uint8."""
        sam = self.sam
        inputs = torch.as_tensor(inputs).to(sam.device, non_blocking=True).float()
        with self._autocast():
            embeddings = self._encode(sam.preprocess(inputs))  # (b, c, h, w)
        return torch.stack([self._masks_of_embedding(e[None]) for e in embeddings])

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image encoder on preprocessed ``(b, 3, S, S)`` images; a compiled encoder sees one batch size only."""
        if self.encoder is self.sam.image_encoder:
            return self.encoder(images)
        b = images.shape[0]
        self.compiled_batch = self.compiled_batch or b
        if b > self.compiled_batch:  # a longer batch than the first: run it in slices of the traced size
            return torch.cat([self._encode(part) for part in images.split(self.compiled_batch)])
        if b < self.compiled_batch:  # the last, short batch: pad rather than compile a second graph
            images = torch.cat([images, images.new_zeros(self.compiled_batch - b, *images.shape[1:])])
        return self.encoder(images)[:b]

    def _masks_of_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """All points of one image: ``(1, c, h, w)`` embedding -> bool ``(k, 3, H, W)``."""
        chunks = []
        for start in range(0, self.num_points, self.points_per_batch):
            with self._autocast():
                low_res = decode_multimask_shared_image(
                    self.sam.mask_decoder, embedding + self.dense, self.image_pe, self.sparse[start : start + self.points_per_batch]
                )  # (k, 3, h', w') logits
            # rows and columns share one matrix: images are square
            logits = self.upsample @ low_res.float() @ self.upsample.T  # (k, 3, H, W), as Sam.postprocess_masks
            chunks.append(logits > self.sam.mask_threshold)
        return torch.cat(chunks)
