"""Stage 2 over an image folder: check the inputs, share out the images, embed them, write the files.

``<in_images_path>/<class>/<image>`` plus the stage-1 masks
``<in_masks_path>/<class>/<stem>.pkl`` give ``<out_data_path>/<class>/<stem>.pkl``:
float32 (or float16) embeddings ``(N, 3, D)`` per image (see
:mod:`partwhole.embeds.mask_embedding` for the maths).

* :func:`check_inputs` fails early, with one line naming the file or folder,
  on class folders that differ, missing mask files and a first mask file that
  does not fit ``img_height x img_width`` with 3 levels.
* :func:`embed_folder` runs :class:`EmbedStage` through the per-image driver
  shared with stage 1 (:func:`~partwhole.common.per_image_runner.run_per_image`:
  this process's share of the images, finished files skipped unless ``overwrite``,
  ``failed.txt``, stop signals, disk full, progress). The stage loads images and
  masks in DataLoader workers, embeds them in packed batches and writes each file
  atomically.

* :func:`run_embed_folder`: the stage end to end (check, launch the processes, embed).

Library code: plain arguments and one frozen dataclass (:class:`EmbedFolderConfig`), no flags; a bad
setting is a :class:`~partwhole.common.errors.SettingError` naming the field (the command line,
``partwhole_cli/embeds.py``, names its flag instead).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from partwhole.common.errors import InputError, SettingError, check_choice
from partwhole.common.image_folders import (
    ImageRecord,
    list_classes,
    list_image_folder,
    load_rgb_image,
)
from partwhole.common.mask_io import read_distinct_masks, save_embeddings
from partwhole.common.per_image_runner import (
    PerImageStage,
    ReadFailure,
    WorkerContext,
    launch_workers,
    record_failure,
    run_per_image,
)
from partwhole.common.processes import (
    end_loader_workers_at_exit,
    ignore_stop_signals,
    keep_freed_memory,
)
from partwhole.common.runtime import prepare_output_folder
from partwhole.embeds.encoder_weights import resolve_encoder_checkpoint
from partwhole.embeds.mask_embedding import (
    DEFAULT_ENCODER,
    EMBED_PRECISIONS,
    MaskedImageEncoder,
    build_encoder,
    check_model_name,
    unpack_masks,
)

log = logging.getLogger(__name__)

LEVELS = 3  # SAM's multimask output: levels 0, 1, 2
EMBED_DTYPES = {"float32": np.float32, "float16": np.float16}
STAGE_NAME = "masks_to_embeds"


@dataclass(frozen=True)
class EmbedFolderConfig:
    """Everything stage 2 needs, checked on construction (:class:`SettingError` naming the field).

    Attributes:
        in_masks_path: stage-1 masks ``<in_masks_path>/<class>/<stem>.pkl`` (either mask format).
        in_images_path: images ``<in_images_path>/<class>/<image>``.
        out_data_path: where to write ``<class>/<stem>.pkl`` embeddings ``(N, 3, D)``.
        encoder_model_name: timm model name (with or without a pretrained tag).
        pretrained: timm's pretrained weights (False: random weights, tests only).
        encoder_checkpoint: a local weights file, or the name of a packaged one
            (``encoder_weights.PACKAGED_WEIGHTS``); read instead of timm's weights.
        crop: cut each masked image to its mask's bounding box.
        img_height, img_width: the size images are resized to; must match the masks (stage 1's ``img_size``).
        embed_dtype: ``float32`` or ``float16``, of the written embeddings.
        batch_size: masked images per forward pass; None: ``mask_embedding.default_batch_size``.
        precision: ``auto``, ``fp32`` or ``bf16``.
        overwrite: recompute images whose embedding file exists (default: skip them, i.e. resume).
        skip_missing: skip images without a mask file (listed in ``failed.txt``) instead of stopping.
        skip_bad_images: skip unreadable images or mask files (listed in ``failed.txt``).
        num_workers: DataLoader processes; None: 0 on CPU, several on CUDA.
        progress: a progress bar.
    """

    in_masks_path: Path
    in_images_path: Path
    out_data_path: Path
    encoder_model_name: str = DEFAULT_ENCODER
    pretrained: bool = True
    encoder_checkpoint: Path | None = None
    crop: bool = False
    img_height: int = 224
    img_width: int = 224
    embed_dtype: str = "float32"
    batch_size: int | None = None  # None: mask_embedding.default_batch_size (device dependent)
    precision: str = "auto"
    overwrite: bool = False
    skip_missing: bool = False
    skip_bad_images: bool = False
    num_workers: int | None = None  # None: 0 on CPU, several loader processes on CUDA
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("in_masks_path", "in_images_path", "out_data_path"):
            value = getattr(self, name)
            if value in (None, ""):
                raise SettingError(name, "", "required: give a folder")
            object.__setattr__(self, name, Path(value))
        checkpoint = self.encoder_checkpoint
        object.__setattr__(self, "encoder_checkpoint", None if checkpoint in (None, "") else resolve_encoder_checkpoint(checkpoint))
        for name in ("img_height", "img_width"):
            if getattr(self, name) < 1:
                raise SettingError(name, getattr(self, name), "must be a positive number of pixels (the img_size of stage 1)")
        check_choice("embed_dtype", self.embed_dtype, EMBED_DTYPES)
        check_choice("precision", self.precision, EMBED_PRECISIONS)
        if self.batch_size is not None and self.batch_size < 1:
            raise SettingError("batch_size", self.batch_size, "must be at least 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise SettingError("num_workers", self.num_workers, "must be 0 or more")

    def mask_path(self, record: ImageRecord) -> Path:
        """The stage-1 mask file of ``record``: ``<in_masks_path>/<class>/<stem>.pkl``."""
        return record.output_path(self.in_masks_path)


@dataclass
class CheckedInputs:
    """What :func:`check_inputs` found: images with masks, images without, points per image."""

    records: list[ImageRecord]
    missing: list[ImageRecord] = field(default_factory=list)
    num_points: int = 0


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit]) or "(none)"
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_mask_record(path: Path, shape: tuple[int, ...], meta: dict[str, Any], *, height: int, width: int,
                      num_points: int | None = None, first_path: Path | None = None) -> int:
    """Check the shape ``(N, L, H, W)`` and metadata of the masks read from ``path``; return ``N``.

    Raises:
        InputError: not 3 levels, not ``height x width``, ``N`` not the stored
            grid squared, or ``N`` not the ``num_points`` of ``first_path``.
    """
    n, levels, mask_h, mask_w = shape
    if levels != LEVELS:
        raise InputError(f"{path}: masks have {levels} levels, expected {LEVELS} (SAM multimask output); rerun stage 1 for this image")
    if (mask_h, mask_w) != (height, width):
        raise InputError(f"{path}: masks are {mask_h}x{mask_w} (height x width) but img_height={height}, img_width={width}; "
                         f"pass the size stage 1 used (img_height={mask_h}, img_width={mask_w}) or rerun stage 1")
    grid = meta.get("grid")
    if grid is not None and int(grid) ** 2 != n:
        raise InputError(f"{path}: {n} masks per level but the file's grid is {grid}x{grid}; the file is inconsistent, rerun stage 1 for it")
    if n == 0:
        raise InputError(f"{path}: holds no masks; rerun stage 1 for this image")
    if num_points is not None and n != num_points:
        raise InputError(f"{path}: {n} points but {num_points} in {first_path}; every image needs the same grid "
                         "(rerun stage 1 with one img_size and patch_size)")
    return n


def check_inputs(cfg: EmbedFolderConfig) -> CheckedInputs:
    """Fail early on inputs that cannot work; return the images to embed.

    Raises:
        SettingError: unknown ``encoder_model_name``, no ``encoder_checkpoint`` file, no images in
            ``in_images_path``, class folders that differ or mask files missing under ``in_masks_path``
            (unless ``cfg.skip_missing``).
        InputError: the first mask file does not fit, or the output folder cannot be written. Temporary files a killed run left
            in the output folder are removed.
    """
    check_model_name(cfg.encoder_model_name)
    if cfg.encoder_checkpoint is not None and not cfg.encoder_checkpoint.is_file():
        raise SettingError("encoder_checkpoint", cfg.encoder_checkpoint, "file not found; give a local weights file")
    image_classes = list_classes(cfg.in_images_path)
    mask_classes = list_classes(cfg.in_masks_path)
    if image_classes != mask_classes:
        only_images = sorted(set(image_classes) - set(mask_classes))
        only_masks = sorted(set(mask_classes) - set(image_classes))
        raise SettingError(
            "in_masks_path", cfg.in_masks_path,
            f"class folders differ: {cfg.in_images_path} has [{_names(image_classes)}] but {cfg.in_masks_path} has "
            f"[{_names(mask_classes)}] (only in images: [{_names(only_images)}]; only in masks: [{_names(only_masks)}]); "
            "give the stage-1 output of in_images_path (run stage 1 for the missing classes)",
        )
    records = list_image_folder(cfg.in_images_path, image_classes)
    if not records:
        raise SettingError("in_images_path", cfg.in_images_path, "no images in its class folders")
    missing = [r for r in records if not cfg.mask_path(r).is_file()]
    if missing and not cfg.skip_missing:
        first = ", ".join(str(cfg.mask_path(r)) for r in missing[:5])
        raise SettingError("in_masks_path", cfg.in_masks_path,
                           f"{len(missing)} of {len(records)} images have no mask file there (first: {first}); "
                           "run stage 1 for them, or skip them with skip_missing (listed in failed.txt)")
    missing_set = set(missing)
    present = [r for r in records if r not in missing_set]
    if not present:
        raise SettingError("in_masks_path", cfg.in_masks_path, f"no mask file for any of the {len(records)} images; run stage 1 first")
    first_path = cfg.mask_path(present[0])
    first = read_distinct_masks(first_path)
    num_points = check_mask_record(first_path, first.shape, first.meta, height=cfg.img_height, width=cfg.img_width)
    prepare_output_folder(cfg.out_data_path)
    return CheckedInputs(records=present, missing=missing, num_points=num_points)


class MaskedImageDataset(Dataset):
    """Image ``i`` of ``records`` with its masks, as tensors (runs in DataLoader workers).

    Items are dicts: ``index``, ``image`` uint8 ``(3, H, W)``, ``bits`` (the
    image's distinct masks, one bit-packed mask per row, see
    :func:`read_distinct_masks`), ``mask_index`` ``(N, 3)`` (which distinct mask
    each point and level has) and ``shape`` ``(N, 3, H, W)``; or ``index`` and
    ``error`` (one line) for a bad file. :func:`item_masks` unpacks the masks on
    the device: a worker hands over 8x fewer bytes through shared memory, and
    each distinct mask only once, as stage 1 stored it.
    """

    def __init__(self, records: list[ImageRecord], cfg: EmbedFolderConfig, num_points: int, first_path: Path):
        self.records, self.cfg, self.num_points, self.first_path = records, cfg, num_points, first_path

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, cfg = self.records[index], self.cfg
        path = cfg.mask_path(record)
        try:
            masks = read_distinct_masks(path)
            check_mask_record(path, masks.shape, masks.meta, height=cfg.img_height, width=cfg.img_width,
                              num_points=self.num_points, first_path=self.first_path)
            image = load_rgb_image(record.path, (cfg.img_width, cfg.img_height))
        except InputError as exc:
            return {"index": index, "error": str(exc)}
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        return {"index": index, "image": pixels, "bits": torch.from_numpy(masks.bits.copy()),
                "mask_index": torch.from_numpy(masks.index), "shape": torch.tensor(masks.shape)}


def item_masks(item: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distinct (M, H, W) bool on device, index (N, 3))`` of a :class:`MaskedImageDataset` item."""
    height, width = (int(v) for v in item["shape"][2:])
    return unpack_masks(item["bits"].to(device, non_blocking=True), height, width), item["mask_index"]


def _default_num_workers(device: torch.device, world_size: int) -> int:
    if device.type != "cuda":
        return 0  # on CPU the model dominates; loader processes would only steal its cores
    return max(1, min(8, (os.cpu_count() or 2) // max(1, world_size) - 1))


def non_finite_error(image: Path, embeds: np.ndarray, stored: np.ndarray) -> InputError:
    """Why an image's embeddings ``(N, 3, D)`` cannot be written: which mask (point, level) first, and whether
    float16 overflowed (``embeds`` finite as computed, ``stored`` not: a :class:`SettingError` of ``embed_dtype``)."""
    point, level = np.argwhere(~np.isfinite(stored).all(-1))[0]
    count = int((~np.isfinite(stored).all(-1)).sum())
    where = f"the mask of point {point}, level {level} (and {count - 1} more)" if count > 1 else f"the mask of point {point}, level {level}"
    if np.isfinite(embeds).all():
        peak = float(np.abs(embeds).max())
        return SettingError("embed_dtype", "float16", f"{image}: {where} embeds to values up to {peak:.3g}, beyond float16's "
                            "65504; not written (the files written before it are kept): rerun with float32")
    return InputError(f"{image}: {where} embeds to NaN or inf; not written (the files written before it are kept): check the "
                      "encoder weights (and precision)")


class EmbedStage(PerImageStage):
    """Stage 2 for :func:`~partwhole.common.per_image_runner.run_per_image`: one embedding file per image.

    Images and masks are read in DataLoader workers (:class:`MaskedImageDataset`), embedded in
    batches that span images (:meth:`MaskedImageEncoder.embed_stream`, built on the first image, so a
    run with nothing left to do loads no model), and each file is written in this thread.
    """

    name = STAGE_NAME

    def __init__(self, cfg: EmbedFolderConfig, inputs: CheckedInputs, worker: WorkerContext):
        self.cfg, self.inputs, self.worker = cfg, inputs, worker
        self.out_root, self.skip_bad_images = cfg.out_data_path, cfg.skip_bad_images
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else _default_num_workers(worker.device, worker.world_size)
        self.dtype = EMBED_DTYPES[cfg.embed_dtype]

    def load(self, records: Sequence[ImageRecord]) -> Iterator[tuple[ImageRecord, dict[str, Any]] | ReadFailure]:
        num_workers = self.num_workers
        dataset = MaskedImageDataset(list(records), self.cfg, self.inputs.num_points, self.cfg.mask_path(self.inputs.records[0]))
        if num_workers:
            end_loader_workers_at_exit()  # they ignore SIGTERM: see ignore_stop_signals
        loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                            pin_memory=self.worker.device.type == "cuda", prefetch_factor=4 if num_workers else None,
                            worker_init_fn=ignore_stop_signals if num_workers else None)
        for item in loader:
            record = records[int(item["index"])]
            yield ReadFailure(record, item["error"]) if "error" in item else (record, item)

    def compute(self, items: Iterator[tuple[ImageRecord, dict[str, Any]]]) -> Iterator[tuple[ImageRecord, np.ndarray]]:
        cfg, worker, device = self.cfg, self.worker, self.worker.device
        model = build_encoder(cfg.encoder_model_name, pretrained=cfg.pretrained, checkpoint=cfg.encoder_checkpoint, device=device)
        encoder = MaskedImageEncoder(model, device=device, crop=cfg.crop, batch_size=cfg.batch_size, precision=cfg.precision)
        log.info("rank %d/%d: embedding on %s, %s, batch %d, %d loader workers, crop=%s",
                 worker.rank, worker.world_size, device, encoder.precision, encoder.batch_size, self.num_workers, cfg.crop)
        start = time.perf_counter()
        yield from encoder.embed_stream((record, item["image"], *item_masks(item, device)) for record, item in items)
        seconds = time.perf_counter() - start
        log.info("rank %d: %d distinct masked images embedded in %.1f s (%.1f/s)",
                 worker.rank, encoder.masked_images, seconds, encoder.masked_images / max(seconds, 1e-9))

    def save(self, record: ImageRecord, embeds: np.ndarray) -> int:
        """Write ``embeds`` in ``embed_dtype``; refuse (:class:`InputError`) values that are not finite there."""
        with np.errstate(over="ignore"):  # an overflow is reported below, by image and mask
            stored = embeds.astype(self.dtype, copy=False)
        if not np.isfinite(stored).all():
            raise non_finite_error(record.path, embeds, stored)
        return save_embeddings(record.output_path(self.out_root), stored)


def embed_folder(cfg: EmbedFolderConfig, inputs: CheckedInputs, worker: WorkerContext | None = None) -> str:
    """Embed this process's share of ``inputs.records`` (:class:`EmbedStage`); return the summary line.

    SIGTERM or SIGUSR1 end the run after the images in the encoder are written,
    with :class:`~partwhole.common.per_image_runner.Interrupted`; a rerun resumes.

    Raises:
        InputError: a bad mask or image file (unless ``cfg.skip_bad_images``:
            then it is listed in ``failed.txt``), or non-finite embeddings.
            Files already written stay.
        OutputWriteError: the disk is full (or the folder read-only); the
            message says how much the remaining images need.
        Interrupted: a stop signal came before the last image.
    """
    worker = worker or WorkerContext()
    device = worker.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        if worker.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // worker.world_size))
        if keep_freed_memory():
            log.info("glibc malloc keeps freed memory (no per-batch page faults; see processes.keep_freed_memory)")
    if worker.is_main:
        for record in inputs.missing:
            record_failure(cfg.out_data_path, record.path, f"no mask file {cfg.mask_path(record)} (skipped: skip_missing)")
    progress = run_per_image(EmbedStage(cfg, inputs, worker), inputs.records, worker=worker, overwrite=cfg.overwrite,
                             show_progress=cfg.progress)
    return progress.summary


def run_embed_folder(cfg: EmbedFolderConfig, *, device: str = "cpu", num_processes: int = 1, num_nodes: int = 1) -> str:
    """Stage 2 end to end: check the inputs (once, before any process is launched), launch ``num_processes`` x
    ``num_nodes`` workers on ``device``, embed this process's share (:func:`embed_folder`); return the summary line.

    Raises:
        SettingError, InputError: bad settings or inputs (see :func:`check_inputs`, :func:`embed_folder`).
        ValueError: a bad ``device``.
        Interrupted: a stop signal came before the last image; a rerun resumes.
    """
    for name, value in (("num_processes", num_processes), ("num_nodes", num_nodes)):
        if value < 1:
            raise SettingError(name, value, "must be at least 1")
    inputs = check_inputs(cfg)  # before launching, so a bad input is reported once
    return embed_folder(cfg, inputs, launch_workers(device, num_processes, num_nodes))
