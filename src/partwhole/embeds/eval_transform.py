"""timm's eval transform, run on whole batches of masked images on the device.

timm evaluates a model on ``Resize -> CenterCrop -> ToTensor -> Normalize`` of a
PIL image (``timm.data.create_transform(**resolve_model_data_config(model),
is_training=False)``). Stage 2 feeds it hundreds of masked copies of one image,
so :class:`BatchedEvalTransform` does the same arithmetic on a batch of tensors:

* Pillow resizes in two separable passes, horizontal then vertical; each pass
  is a fixed linear map of 8-bit pixels followed by rounding and clipping to
  0..255. :func:`pil_resample_matrices` builds those maps as matrices, with
  Pillow's filters, supports and 22-bit coefficients, so
  ``round(R_h @ round(x @ R_w^T))`` is Pillow's resize except where float32
  sums land within ~1e-3 of a rounding edge that Pillow's integer sums fall
  the other side of: about 1 pixel in 10^4 ends one (rarely two) 8-bit levels off.
* Cutting a masked image to its mask's bounding box (``crop``) and the centre
  crop only pick rows and columns, so they fold into the same matrices: each
  masked image gets its own ``(out_h, H)`` and ``(out_w, W)`` pair and one
  batched matmul does box crop, resize and centre crop together.
* ``ToTensor`` and ``Normalize`` are an affine map per channel.

Transforms with other steps (e.g. timm's ``crop_mode='border'``) are not
translated: :meth:`BatchedEvalTransform.from_timm` returns ``None`` and the
caller keeps the PIL path.

Based on Pillow ``src/libImaging/Resample.c`` (``bicubic_filter``,
``precompute_coeffs``, ``normalize_coeffs_8bpc``, ``ImagingResampleInner``),
torchvision's ``resize`` size rule and ``center_crop``, and timm's
``transforms_imagenet_eval``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Pillow keeps 8-bit resampling coefficients as integers of this many fraction bits.
PIL_PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel (Keys, a = -0.5), support 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    """Pillow's triangle kernel, support 1."""
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


# interpolation name (torchvision InterpolationMode value) -> (kernel, support)
PIL_FILTERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "bicubic": (_bicubic, 2.0),
    "bilinear": (_bilinear, 1.0),
}


def pil_resample_matrices(
    start: torch.Tensor,
    length: torch.Tensor,
    new_length: torch.Tensor,
    offset: torch.Tensor,
    out_length: int,
    full_length: int,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Pillow's resampling weights along one axis, for a batch of ``K`` spans.

    Item ``k`` resizes the span ``[start[k], start[k] + length[k])`` of an axis
    of ``full_length`` pixels to ``new_length[k]`` pixels and keeps resized
    pixels ``offset[k] .. offset[k] + out_length - 1`` (the centre crop; indices
    outside ``0 .. new_length[k] - 1`` are zero rows, i.e. the crop's padding).

    Args:
        start, length, new_length, offset: int tensors ``(K,)``.
        out_length: pixels kept after the centre crop.
        full_length: pixels of the un-cropped axis.
        interpolation: a key of :data:`PIL_FILTERS`.

    Returns:
        float32 ``(K, out_length, full_length)``: ``out = W @ pixels`` along the axis.
    """
    kernel, base_support = PIL_FILTERS[interpolation]
    f64 = dict(dtype=torch.float64, device=start.device)
    start, length, new_length, offset = (t.to(**f64)[:, None] for t in (start, length, new_length, offset))
    resized_index = torch.arange(out_length, **f64)[None, :] + offset  # (K, out)
    scale = length / new_length  # (K, 1) input pixels per output pixel
    filterscale = scale.clamp(min=1.0)  # widen the kernel when shrinking (antialias)
    support = base_support * filterscale
    center = (resized_index + 0.5) * scale  # in span coordinates
    lo = torch.floor(center - support + 0.5).clamp(min=0.0)
    hi = torch.minimum(torch.floor(center + support + 0.5), length)
    # Each output pixel reads at most `taps` input pixels from `lo` on: evaluate the kernel there only.
    taps = int(torch.ceil(support.max()).item()) * 2 + 1
    x = lo[..., None] + torch.arange(taps, **f64)  # (K, out, taps) span coordinates
    used = x < hi[..., None]
    weights = kernel((x - center[..., None] + 0.5) / filterscale[..., None]) * used
    total = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    # Pillow rounds the coefficients to integers (half away from zero).
    one = float(1 << PIL_PRECISION_BITS)
    weights = torch.sign(weights) * torch.floor(weights.abs() * one + 0.5) / one
    kept = (resized_index >= 0) & (resized_index < new_length)  # outside: the centre crop's zero padding
    weights = (weights * kept[..., None]).to(torch.float32)
    column = (x + start[..., None]).long().clamp_(0, full_length - 1)  # unused taps carry weight 0
    dense = torch.zeros(start.shape[0], out_length, full_length, dtype=torch.float32, device=start.device)
    return dense.scatter_add_(2, column, weights)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes of bool masks ``(K, H, W)`` as int64 ``(K, 4)`` ``(top, left, height, width)``.

    An empty mask gets the whole image (the reference keeps the full image then).
    """
    k, height, width = masks.shape
    rows = masks.any(dim=2).to(torch.uint8)  # (K, H)
    cols = masks.any(dim=1).to(torch.uint8)  # (K, W)
    top = rows.argmax(dim=1)
    bottom = height - rows.flip(1).argmax(dim=1)
    left = cols.argmax(dim=1)
    right = width - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([top, left, bottom - top, right - left], dim=1).long()
    full = torch.tensor([0, 0, height, width], device=masks.device).expand(k, 4)
    return torch.where(rows.any(dim=1, keepdim=True).bool(), boxes, full)


@dataclass(frozen=True)
class BatchedEvalTransform:
    """timm's eval transform (PIL resize, centre crop, to-tensor, normalise) on batches of tensors.

    Attributes:
        resize: ``(short_side,)`` (torchvision ``Resize(int)``: keep the aspect
            ratio) or ``(height, width)``.
        interpolation: ``'bicubic'`` or ``'bilinear'`` (Pillow filters).
        crop: centre-crop ``(height, width)``, or ``None`` for no centre crop.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels.
    """

    resize: tuple[int, ...]
    interpolation: str
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_timm(cls, transform) -> "BatchedEvalTransform | None":
        """Translate a timm eval transform (a torchvision ``Compose``); ``None`` if it has other steps."""
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", [transform]))
        names = [type(s).__name__ for s in steps]

        def unsupported(why: str) -> None:
            log.info("eval transform %s: %s; embedding through the per-image PIL path", names, why)
            return None

        resize = crop = None
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        seen_tensor = False
        for step in steps:
            if isinstance(step, T.Resize) and resize is None and not seen_tensor:
                size = step.size
                size = (size,) if isinstance(size, int) else tuple(int(s) for s in size)
                interp = getattr(step.interpolation, "value", step.interpolation)
                if step.max_size is not None or interp not in PIL_FILTERS or len(size) not in (1, 2):
                    return unsupported(f"Resize({step.size}, {interp}, max_size={step.max_size}) not translated")
                resize, interpolation = size, interp
            elif isinstance(step, T.CenterCrop) and crop is None and resize is not None and not seen_tensor:
                crop = (int(step.size[0]), int(step.size[1]))
            elif isinstance(step, T.ToTensor) and not seen_tensor:  # timm's MaybeToTensor subclasses it
                seen_tensor = True
            elif isinstance(step, T.Normalize) and seen_tensor:
                mean = tuple(float(v) for v in torch.as_tensor(step.mean).flatten())
                std = tuple(float(v) for v in torch.as_tensor(step.std).flatten())
            else:
                return unsupported(f"step {type(step).__name__} not translated")
        if resize is None or not seen_tensor:
            return unsupported("no Resize or no ToTensor step")
        if len(mean) == 1:
            mean, std = mean * 3, std * 3
        return cls(resize=resize, interpolation=interpolation, crop=crop, mean=mean, std=std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of the transformed image."""
        if self.crop is not None:
            return self.crop
        new_h, new_w = self._resized_size(torch.tensor([height]), torch.tensor([width]))
        return int(new_h), int(new_w)

    def _resized_size(self, height: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision's ``Resize`` output size for int tensors of input sizes."""
        if len(self.resize) == 2:
            return torch.full_like(height, self.resize[0]), torch.full_like(width, self.resize[1])
        short_side = self.resize[0]
        short, long = torch.minimum(height, width), torch.maximum(height, width)
        new_long = (short_side * long) // short  # == int(short_side * long / short) for these sizes
        portrait = width <= height
        new_h = torch.where(portrait, new_long, torch.full_like(height, short_side))
        new_w = torch.where(portrait, torch.full_like(width, short_side), new_long)
        return new_h, new_w

    @staticmethod
    def _crop_offset(new_size: torch.Tensor, out_size: int) -> torch.Tensor:
        """First resized index kept by torchvision's ``center_crop`` (negative: zero padding)."""
        pad_before = torch.where(new_size < out_size, (out_size - new_size) // 2, torch.zeros_like(new_size))
        padded = torch.clamp(new_size, min=out_size)
        top = torch.round((padded - out_size).double() / 2.0).long()  # Python round: half to even
        return top - pad_before

    def matrices(self, boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column maps for images ``(height, width)`` cut to ``boxes`` ``(K, 4)`` (top, left, h, w).

        Returns ``(R_h (K, out_h, height), R_w (K, out_w, width))``.
        """
        top, left, box_h, box_w = boxes.long().unbind(dim=1)
        new_h, new_w = self._resized_size(box_h, box_w)
        if self.crop is None:
            if not (bool((new_h == new_h[0]).all()) and bool((new_w == new_w[0]).all())):
                raise ValueError("without a centre crop every box must resize to one size; batch them separately")
            out_h, out_w = int(new_h[0]), int(new_w[0])
            off_h, off_w = torch.zeros_like(new_h), torch.zeros_like(new_w)
        else:
            out_h, out_w = self.crop
            off_h, off_w = self._crop_offset(new_h, out_h), self._crop_offset(new_w, out_w)
        rows = pil_resample_matrices(top, box_h, new_h, off_h, out_h, height, self.interpolation)
        cols = pil_resample_matrices(left, box_w, new_w, off_w, out_w, width, self.interpolation)
        return rows, cols

    def __call__(
        self, image: torch.Tensor, masks: torch.Tensor, *, crop: bool = False, full_maps: tuple | None = None
    ) -> torch.Tensor:
        """Masked, transformed copies of one image.

        Args:
            image: uint8 ``(3, H, W)`` (already resized to the mask size).
            masks: bool ``(K, H, W)``; pixels outside a mask become 0.
            crop: cut each masked image to its mask's bounding box first.
            full_maps: cached ``matrices`` of the whole-image box (used when not cropping).

        Returns:
            float32 ``(K, 3, out_h, out_w)``, normalised model input.
        """
        k, height, width = masks.shape
        if crop:
            rows, cols = self.matrices(mask_boxes(masks), height, width)
            rows, cols = rows[:, None], cols[:, None]  # (K, 1, out, H|W): broadcast over channels
        else:
            if full_maps is None:
                full_maps = self.matrices(torch.tensor([[0, 0, height, width]], device=masks.device), height, width)
            rows, cols = full_maps[0][0], full_maps[1][0]
        pixels = image.to(torch.float32)[None] * masks[:, None]  # (K, 3, H, W), 0..255
        # Pillow: horizontal pass, round and clip to 8 bits, vertical pass, round and clip.
        pixels = torch.floor(pixels @ cols.transpose(-1, -2) + 0.5).clamp_(0.0, 255.0)  # (K, 3, H, out_w)
        pixels = torch.floor(rows @ pixels + 0.5).clamp_(0.0, 255.0)  # (K, 3, out_h, out_w)
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1) * 255.0
        return (pixels - mean) / std
