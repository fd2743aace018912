"""Stage 1 over an image folder: check the settings and inputs, share out the images, compute masks, write the files.

Every image of ``<in_data_path>/<class>/`` is resized to ``img_size`` and prompted with one point
per ``patch_size`` patch; the teacher's three masks per point go to
``<out_data_path>/<class>/<stem>.pkl`` (see :func:`~partwhole.common.mask_io.save_masks`; each
distinct mask once, ``mask_format`` v1 stores all of them). The teacher is SAM 1 or SAM 2.1
(``sam_model_type``, ``teachers.py``); the mask sources ``boxes`` and ``full_image`` write masks
that need no SAM (``mask_sources.py``), in the same format, as controls of the part-whole masks.
Finished files are skipped (``overwrite`` recomputes), each file is written atomically, and
several processes or nodes split the images (Lightning Fabric DDP).

This mirrors stage 2's ``partwhole/embeds/embed_folder.py``:

* :class:`MaskFolderConfig`: every setting of the stage, one frozen dataclass holding the masker's
  :class:`~partwhole.masks.masker_options.MaskerOptions`; checked on construction, errors name
  its fields (:class:`~partwhole.common.errors.SettingError`);
* :func:`check_inputs`: the image folder, the output folder and the checkpoint file, before any
  process is launched or any file is written;
* :func:`write_patched_masks` runs :class:`MaskStage` (how to read, compute and save one image)
  through the per-image driver shared with stage 2 (``per_image_runner.py``: resume,
  ``failed.txt``, stop signals, disk full, progress);
* :func:`run_mask_folder`: the stage end to end.

Library code: plain arguments and dataclasses, no flags; the command line is ``partwhole_cli/masks.py``.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from partwhole.common.errors import InputError, SettingError, check_choice
from partwhole.common.image_folders import (
    ImageRecord,
    list_image_folder,
    load_rgb_image,
)
from partwhole.common.mask_io import DEFAULT_MASK_FORMAT, MASK_FORMATS, save_masks
from partwhole.common.per_image_runner import (
    PerImageStage,
    Progress,
    ReadFailure,
    WorkerContext,
    batched,
    launch_workers,
    run_per_image,
)
from partwhole.common.runtime import prepare_output_folder, resolve_device
from partwhole.masks.mask_sources import (
    MASK_SOURCES,
    PromptFreeMasker,
    build_prompt_free_masker,
    check_source_options,
    superpixel_scales,
)
from partwhole.masks.masker_options import LEVELS, MaskerOptions, parse_box_sizes
from partwhole.masks.sam_points import GridMasker
from partwhole.masks.teachers import (
    DEFAULT_MODEL_TYPE,
    build_masker,
    check_options,
    require_checkpoint_file,
)

log = logging.getLogger(__name__)

STAGE_NAME = "patched_masks"


def no_sam_reason(mask_source: str) -> str:
    """Why a SAM setting is refused with ``mask_source`` (any but ``sam``)."""
    return f"a SAM option, and {mask_source} masks need no SAM: drop it"


@dataclass(frozen=True)
class MaskFolderConfig:
    """Everything stage 1 needs, checked on construction (:class:`SettingError` naming the field).

    Attributes:
        in_data_path: image folder ``<root>/<class>/<image>``.
        out_data_path: mask folder to write, ``<root>/<class>/<stem>.pkl``.
        mask_source: ``sam`` (the teacher ``sam_model_type``), ``boxes`` (sides ``masker.box_sizes``),
            ``full_image`` or ``superpixels`` (scales ``masker.superpixel_scales``); all but ``sam`` need no
            SAM and take no SAM setting.
        sam_model_type: the teacher (a key of ``teachers.TEACHERS``).
        sam_checkpoint: its checkpoint file; None: random weights (tests and timing only).
        masker: the point grid and the masker's options.
        batch_size: images per image-encoder forward.
        overwrite: recompute masks that already exist (default: skip them, i.e. resume).
        skip_bad_images: list unreadable images in ``<out_data_path>/failed.txt`` and carry on.
        mask_format: ``v2`` (each distinct mask once plus an index) or ``v1`` (all masks).
        show_progress: a progress bar.
    """

    in_data_path: Path
    out_data_path: Path
    mask_source: str = "sam"
    sam_model_type: str = DEFAULT_MODEL_TYPE
    sam_checkpoint: str | os.PathLike | None = None
    masker: MaskerOptions = field(default_factory=MaskerOptions)
    batch_size: int = 8
    overwrite: bool = False
    skip_bad_images: bool = False
    mask_format: str = DEFAULT_MASK_FORMAT
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("in_data_path", "out_data_path"):
            value = getattr(self, name)
            if value in (None, ""):
                raise SettingError(name, "", "required: give a folder")
            object.__setattr__(self, name, Path(value))
        check_choice("mask_source", self.mask_source, MASK_SOURCES)
        check_choice("mask_format", self.mask_format, MASK_FORMATS)
        if self.batch_size < 1:
            raise SettingError("batch_size", self.batch_size, "must be at least 1")
        if self.mask_source == "sam":
            check_options(self.sam_model_type, self.masker)  # an unknown teacher, or an option it does not take
            return
        check_source_options(self.mask_source, self.masker)
        if self.sam_checkpoint is not None:
            raise SettingError("sam_checkpoint", self.sam_checkpoint, no_sam_reason(self.mask_source))
        if self.sam_model_type != DEFAULT_MODEL_TYPE:
            raise SettingError("sam_model_type", self.sam_model_type, no_sam_reason(self.mask_source))
        if self.mask_source == "boxes":
            parse_box_sizes(self.masker.box_sizes)  # the boxes need their sides

    def metadata(self) -> dict[str, Any]:
        """What every mask file of this run carries beside its masks (the mask source and its settings)."""
        options = self.masker
        meta: dict[str, Any] = dict(grid=options.grid, img_size=options.img_size, patch_size=options.patch_size, levels=LEVELS,
                                    mask_source=self.mask_source)
        if self.mask_source == "boxes":
            meta["box_sizes"] = options.box_sizes
        elif self.mask_source == "superpixels":
            meta["superpixel_scales"] = superpixel_scales(options)  # the defaults if not given
        elif self.mask_source == "sam":
            checkpoint = Path(self.sam_checkpoint).name if self.sam_checkpoint is not None else None
            meta.update(sam_model=self.sam_model_type, sam_checkpoint=checkpoint, point_labels=options.point_labels,
                        precision=options.precision)
        return meta


def writer_threads() -> int:
    """Threads that compress and write mask files: half the CPU cores, 2 to 8.

    Packing and zlib take up to ~0.1 s per 224 px image on one core when the
    masks rarely repeat (v1; v2 of masks that repeat, as a photo's do: 10-25 ms,
    ``bench/mask_file_sizes.py``), so two threads could cap a run near 20
    images/s, under what one GPU computes; zlib releases the GIL, so more
    threads write more files at once.
    """
    return min(8, max(2, (os.cpu_count() or 2) // 2))


class MaskStage(PerImageStage):
    """Stage 1 for :func:`~partwhole.common.per_image_runner.run_per_image`: one mask file per image.

    Images are read one batch ahead in a background thread and files are compressed
    and written in background threads while the masker runs on the next batch.
    """

    name = STAGE_NAME

    def __init__(self, masker: GridMasker | PromptFreeMasker, cfg: MaskFolderConfig, meta: dict[str, Any] | None = None):
        self.masker, self.cfg, self.meta = masker, cfg, meta or {}
        self.out_root, self.batch_size, self.skip_bad_images = cfg.out_data_path, cfg.batch_size, cfg.skip_bad_images
        self.save_threads = writer_threads()
        self.saves_in_flight = cfg.batch_size  # the files of one batch are written while SAM computes the next

    def read(self, record: ImageRecord) -> tuple[ImageRecord, np.ndarray] | ReadFailure:
        """The image resized and turned into the masker's model input, or why it cannot be read."""
        try:
            image = load_rgb_image(record.path, (self.masker.img_size, self.masker.img_size))
        except InputError as exc:
            return ReadFailure(record, str(exc))
        return record, self.masker.model_input(np.asarray(image))

    def load(self, records: Sequence[ImageRecord]) -> Iterator[tuple[ImageRecord, np.ndarray] | ReadFailure]:
        with ThreadPoolExecutor(max_workers=1) as reader:
            ahead: deque = deque()
            for record in records:
                ahead.append(reader.submit(self.read, record))
                if len(ahead) > self.batch_size:  # the next batch is read while SAM computes this one
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def compute(self, items: Iterator[tuple[ImageRecord, np.ndarray]]) -> Iterator[tuple[ImageRecord, np.ndarray]]:
        for batch in batched(items, self.batch_size):
            records, inputs = zip(*batch)
            yield from zip(records, self.masker.predict_model_inputs(np.stack(inputs)).cpu().numpy())

    def save(self, record: ImageRecord, masks: np.ndarray) -> int:
        return save_masks(record.output_path(self.out_root), masks, mask_format=self.cfg.mask_format, **self.meta)


def write_patched_masks(records: Sequence[ImageRecord], masker: GridMasker | PromptFreeMasker, cfg: MaskFolderConfig, *,
                        worker: WorkerContext | None = None, meta: dict[str, Any] | None = None) -> Progress:
    """Write the masks of this worker's share of ``records`` under ``cfg.out_data_path`` (:class:`MaskStage`).

    ``meta``: what each file carries beside its masks (:meth:`MaskFolderConfig.metadata`). A bad image
    raises :class:`InputError`, or with ``cfg.skip_bad_images`` goes to ``failed.txt``. SIGTERM or
    SIGUSR1 let the batch in hand finish and be written, then raise
    :class:`~partwhole.common.per_image_runner.Interrupted`.

    Returns:
        the closed :class:`Progress` (its counts and summary line).

    Raises:
        OutputWriteError: the disk is full (or the folder read-only): the message
            says how much the remaining images need; finished files are kept.
    """
    stage = MaskStage(masker, cfg, meta)
    return run_per_image(stage, records, worker=worker or WorkerContext(device=masker.device), overwrite=cfg.overwrite,
                         show_progress=cfg.show_progress)


def check_inputs(cfg: MaskFolderConfig) -> list[ImageRecord]:
    """The images to mask; fails early, before any process is launched or any mask computed.

    Raises:
        SettingError: no images under ``in_data_path``, or no ``sam_checkpoint`` file.
        InputError: no class folders, or the output folder cannot be written. Temporary files a
            killed run left in the output folder are removed.
    """
    records = list_image_folder(cfg.in_data_path)
    if not records:
        raise SettingError("in_data_path", cfg.in_data_path,
                           "no images in its class folders (expected <root>/<class>/<image>, e.g. datasets/imagenette2/val)")
    prepare_output_folder(cfg.out_data_path)  # also removes temporary files a killed run left
    if cfg.mask_source == "sam" and cfg.sam_checkpoint is not None:
        require_checkpoint_file(cfg.sam_checkpoint, cfg.sam_model_type)
    return records


def build_folder_masker(cfg: MaskFolderConfig, device: torch.device | str) -> GridMasker | PromptFreeMasker:
    """The masker of ``cfg.mask_source``: the teacher on ``device``, or a masker without SAM (on the CPU)."""
    if cfg.mask_source != "sam":
        return build_prompt_free_masker(cfg.mask_source, cfg.masker)
    return build_masker(cfg.sam_model_type, cfg.sam_checkpoint, device, cfg.masker)


def run_mask_folder(cfg: MaskFolderConfig, *, device: str = "cpu", num_processes: int = 1, num_nodes: int = 1) -> Progress:
    """Stage 1 end to end: check, launch ``num_processes`` x ``num_nodes`` workers on ``device``, build, write.

    Every cheap check (``cfg`` itself on construction, the device, the folders, the checkpoint
    file) runs before any process is launched or any file is written.

    Raises:
        SettingError, InputError: bad settings or inputs (see :func:`check_inputs`).
        ValueError: a bad ``device``.
        Interrupted: a stop signal came before the last image; a rerun resumes.
    """
    resolve_device(device)
    records = check_inputs(cfg)
    worker = launch_workers(device, num_processes, num_nodes)
    masker = build_folder_masker(cfg, worker.device)
    return write_patched_masks(records, masker, cfg, worker=worker, meta=cfg.metadata())
