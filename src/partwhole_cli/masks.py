"""Stage 1: SAM masks for every patch of every image of a folder.

Every image of ``<in_data_path>/<class>/`` is resized to ``img_size`` and
prompted with one point per ``patch_size`` patch; SAM's three masks per point
go to ``<out_data_path>/<class>/<stem>.pkl`` (see ``mask_io.save_masks``; each
distinct mask once, ``--mask_format=v1`` stores all of them). The teacher is SAM 1
(``--sam_model_type=vit_h|vit_l|vit_b``) or SAM 2.1 (``sam2.1_hiera_tiny|small|base_plus|large``);
the files are the same either way. ``--mask_source=boxes|full_image`` writes masks that need no
SAM (``mask_sources.py``: nested boxes around each point, or the whole image), in the same format,
as controls of the part-whole masks.
Finished files are skipped (``--overwrite`` recomputes), each file is written
atomically, and ``--num_processes``/``--num_nodes`` split the images over
Lightning Fabric DDP ranks.

Reference command (still works verbatim)::

    python src/hierarchical_masks/patched_masks.py --device=cuda:1 --split=val \\
        --in_data_path=datasets/imagenette2/val --out_data_path=datasets/imagenette2/val_masks \\
        --sam_checkpoint=sam_vit_h_4b8939.pth --sam_model_type=vit_h --img_size 224 --patch_size=16

This file is the wiring (flags, errors) and :class:`MaskStage` (how to read, compute
and save one image); the teachers (which models, their checkpoints and options) are
``teachers.py``, the maths is in ``sam_points.py`` (SAM 1) and ``sam2_points.py``
(SAM 2.1), the per-image driver shared with stage 2 (resume, ``failed.txt``, stop
signals, disk full, progress) in ``per_image_runner.py``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from partwhole.common.errors import InputError, check_choice
from partwhole.common.image_folders import (
    MASKS_SUFFIX,
    ImageRecord,
    list_image_folder,
    load_rgb_image,
)
from partwhole.common.mask_io import DEFAULT_MASK_FORMAT, MASK_FORMATS, save_masks
from partwhole.common.per_image_runner import (
    Interrupted,
    PerImageStage,
    Progress,
    ReadFailure,
    WorkerContext,
    batched,
    launch_workers,
    run_per_image,
)
from partwhole.common.point_grid import patch_grid_points
from partwhole.common.runtime import PRECISIONS, prepare_output_folder, resolve_device
from partwhole.masks.mask_sources import (
    MASK_SOURCES,
    PromptFreeMasker,
    build_prompt_free_masker,
    parse_box_sizes,
)
from partwhole.masks.sam_attention import ATTENTIONS
from partwhole.masks.sam_points import POINT_LABELS, GridMasker
from partwhole.masks.teachers import (
    DEFAULT_MODEL_TYPE,
    MODEL_TYPES,
    TEST_MODEL_TYPES,
    build_masker,
    check_options,
    default_checkpoint,
    require_checkpoint_file,
)
from partwhole_cli import run_cli, user_error

log = logging.getLogger(__name__)


class MaskStage(PerImageStage):
    """Stage 1 for :func:`~partwhole.common.per_image_runner.run_per_image`: one mask file per image.

    Images are read one batch ahead in a background thread and files are compressed
    and written in background threads while SAM runs on the next batch.
    """

    name = "patched_masks"

    def __init__(self, masker: GridMasker | PromptFreeMasker, out_root: str | os.PathLike, *, batch_size: int = 8, skip_bad_images: bool = False,
                 meta: dict[str, Any] | None = None, mask_format: str = DEFAULT_MASK_FORMAT):
        self.masker, self.out_root, self.batch_size = masker, Path(out_root), batch_size
        self.skip_bad_images, self.meta, self.mask_format = skip_bad_images, meta or {}, mask_format
        self.save_threads = writer_threads()
        self.saves_in_flight = batch_size  # the files of one batch are written while SAM computes the next

    def read(self, record: ImageRecord) -> tuple[ImageRecord, np.ndarray] | ReadFailure:
        """The image resized and turned into SAM's model input, or why it cannot be read."""
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
        return save_masks(record.output_path(self.out_root), masks, mask_format=self.mask_format, **self.meta)


def write_patched_masks(
    records: Sequence[ImageRecord],
    out_root: str | os.PathLike,
    masker: GridMasker | PromptFreeMasker,
    *,
    worker: WorkerContext | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    skip_bad_images: bool = False,
    meta: dict[str, Any] | None = None,
    mask_format: str = DEFAULT_MASK_FORMAT,
    show_progress: bool = True,
) -> Progress:
    """Write the masks of this worker's share of ``records`` under ``out_root`` (:class:`MaskStage`).

    A bad image raises :class:`InputError`, or with ``skip_bad_images`` goes to
    ``failed.txt``. SIGTERM or SIGUSR1 let the batch in hand finish and be
    written, then raise :class:`Interrupted`.

    Returns:
        the closed :class:`Progress` (its counts and summary line).

    Raises:
        OutputWriteError: the disk is full (or the folder read-only): the message
            says how much the remaining images need; finished files are kept.
    """
    stage = MaskStage(masker, out_root, batch_size=batch_size, skip_bad_images=skip_bad_images, meta=meta, mask_format=mask_format)
    return run_per_image(stage, records, worker=worker or WorkerContext(device=masker.device), overwrite=overwrite,
                         show_progress=show_progress)


def writer_threads() -> int:
    """Threads that compress and write mask files: half the CPU cores, 2 to 8.

    Packing and zlib take up to ~0.1 s per 224 px image on one core when the
    masks rarely repeat (v1; v2 of masks that repeat, as a photo's do: 10-25 ms,
    ``bench/mask_file_sizes.py``), so two threads could cap a run near 20
    images/s, under what one GPU computes; zlib releases the GIL, so more
    threads write more files at once.
    """
    return min(8, max(2, (os.cpu_count() or 2) // 2))


# the SAM options a mask source without SAM does not take: (the value that means "not used", its flag)
SAM_ONLY_OPTIONS = {"point_labels": ("foreground", "--point_labels"), "precision": ("fp32", "--precision"),
                    "attention": ("sdpa", "--attention"), "compile_encoder": (False, "--compile")}


def check_mask_source(mask_source: str, box_sizes: Sequence[int | str], **sam_options) -> None:
    """Raise :class:`InputError` for an unknown ``--mask_source``, bad ``--box_sizes``, or an option it does not take."""
    check_choice("mask_source", mask_source, MASK_SOURCES)
    if mask_source == "boxes":
        parse_box_sizes(box_sizes)
    elif box_sizes:
        raise InputError(f"--box_sizes is for --mask_source=boxes, not {mask_source}; drop it")
    if mask_source != "sam":
        for option, value in sam_options.items():
            unused, flag = SAM_ONLY_OPTIONS[option]
            if value != unused:
                raise InputError(f"{flag} is a SAM option; --mask_source={mask_source} runs no SAM: drop it")


def build_stage_masker(mask_source: str, worker: WorkerContext, *, sam_model_type: str, sam_checkpoint: str | None,
                       box_sizes: Sequence[int | str], img_size: int, patch_size: int, point_labels: str, precision: str,
                       **sam_options) -> tuple[GridMasker | PromptFreeMasker, dict[str, Any]]:
    """This worker's masker of ``mask_source`` and the metadata its files carry (the source among it)."""
    meta: dict[str, Any] = dict(grid=img_size // patch_size, img_size=img_size, patch_size=patch_size, levels=3, mask_source=mask_source)
    if mask_source != "sam":
        masker = build_prompt_free_masker(mask_source, img_size=img_size, patch_size=patch_size, box_sizes=box_sizes)
        return masker, {**meta, **({"box_sizes": masker.box_sizes} if mask_source == "boxes" else {})}
    masker = build_masker(sam_model_type, sam_checkpoint, worker.device, img_size=img_size, patch_size=patch_size,
                          point_labels=point_labels, precision=precision, **sam_options)
    meta.update(sam_model=sam_model_type, sam_checkpoint=Path(sam_checkpoint).name if sam_checkpoint else None,
                point_labels=point_labels, precision=precision)
    return masker, meta


def run(
    *,
    in_data_path: str,
    out_data_path: str,
    mask_source: str = "sam",
    box_sizes: Sequence[int | str] = (),
    sam_model_type: str = DEFAULT_MODEL_TYPE,
    sam_checkpoint: str | None = default_checkpoint(DEFAULT_MODEL_TYPE),
    device: str = "cpu",
    img_size: int = 224,
    patch_size: int = 16,
    point_labels: str = "foreground",
    precision: str = "fp32",
    attention: str = "sdpa",
    compile_encoder: bool = False,
    batch_size: int = 8,
    points_per_batch: int = 196,
    overwrite: bool = False,
    skip_bad_images: bool = False,
    mask_format: str = DEFAULT_MASK_FORMAT,
    num_processes: int = 1,
    num_nodes: int = 1,
    show_progress: bool = True,
) -> Progress:
    """Stage 1 end to end, with plain arguments (the CLI's flags).

    ``mask_source``: ``sam`` (the teacher ``sam_model_type``), or ``boxes`` (sides ``box_sizes``) or
    ``full_image``, which need no SAM and take no SAM option (``mask_sources.py``).
    Every cheap check (sizes, flags, folders, checkpoint file) runs before any
    process is launched or any file is written.
    """
    patch_grid_points(img_size, patch_size)  # raises on img_size % patch_size
    check_choice("point_labels", point_labels, POINT_LABELS)
    check_choice("precision", precision, PRECISIONS)
    check_mask_source(mask_source, box_sizes, point_labels=point_labels, precision=precision, attention=attention,
                      compile_encoder=compile_encoder)
    if mask_source == "sam":
        check_options(sam_model_type, point_labels=point_labels, attention=attention, compile_encoder=compile_encoder)
    check_choice("mask_format", mask_format, MASK_FORMATS)
    if batch_size < 1 or points_per_batch < 1:
        raise ValueError(f"--batch_size={batch_size} and --points_per_batch={points_per_batch} must be >= 1")
    resolve_device(device)
    records = list_image_folder(in_data_path)
    if not records:
        raise InputError(f"--in_data_path={in_data_path}: no images in its class folders (expected <root>/<class>/<image>, e.g. datasets/imagenette2/val)")
    prepare_output_folder(out_data_path)  # also removes temporary files a killed run left
    if mask_source == "sam" and sam_checkpoint is not None:
        require_checkpoint_file(sam_checkpoint, sam_model_type)

    worker = launch_workers(device, num_processes, num_nodes)
    masker, meta = build_stage_masker(mask_source, worker, sam_model_type=sam_model_type, sam_checkpoint=sam_checkpoint,
                                      box_sizes=box_sizes, img_size=img_size, patch_size=patch_size, point_labels=point_labels,
                                      precision=precision, attention=attention, points_per_batch=points_per_batch,
                                      compile_encoder=compile_encoder)
    return write_patched_masks(
        records,
        out_data_path,
        masker,
        worker=worker,
        batch_size=batch_size,
        overwrite=overwrite,
        skip_bad_images=skip_bad_images,
        meta=meta,
        mask_format=mask_format,
        show_progress=show_progress,
    )


# --------------------------------------------------------------------------- CLI


def define_flags() -> None:
    """The stage's flags (defined only when run as a script, so importing this module defines none)."""
    from absl import flags

    flags.DEFINE_string("device", None, "torch device: cpu, cuda, cuda:1 (default: cuda if a GPU is visible, else cpu)")
    flags.DEFINE_enum("mask_source", "sam", list(MASK_SOURCES),
                      "sam: SAM's masks (--sam_model_type); boxes: three nested squares around each point (--box_sizes); "
                      "full_image: the whole image at every level (the last two need no SAM: controls of the part-whole masks)")
    flags.DEFINE_list("box_sizes", [], "--mask_source=boxes: the squares' sides in pixels of the resized image, level 0 to 2, "
                      "increasing, e.g. 32,96,192 (box_sizes.py --masks_path=<masks> matches another folder's mean areas)")
    flags.DEFINE_string("split", "val", "dataset split; picks the default in/out folders datasets/imagenette2/<split>[_masks]")
    flags.DEFINE_string("in_data_path", None, "image folder <root>/<class>/<image> (default datasets/imagenette2/<split>)")
    flags.DEFINE_string("out_data_path", None, "mask folder to write (default datasets/imagenette2/<split>_masks)")
    flags.DEFINE_string(
        "sam_checkpoint",
        default_checkpoint(DEFAULT_MODEL_TYPE),
        "SAM checkpoint file (default: the released file name of --sam_model_type, e.g. sam_vit_h_4b8939.pth or "
        "sam2.1_hiera_large.pt); empty or 'none' for random weights (vit_tiny, sam2.1_hiera_test: random unless given)",
    )
    flags.DEFINE_enum(
        "sam_model_type", DEFAULT_MODEL_TYPE, MODEL_TYPES,
        "teacher: SAM 1 (a segment_anything registry key, or vit_tiny) or SAM 2.1 (sam2.1_hiera_*; sam2.1_hiera_test is tiny)",
    )
    flags.DEFINE_alias("model_type", "sam_model_type")
    flags.DEFINE_integer("img_size", 224, "images are resized to img_size x img_size")
    flags.DEFINE_integer("patch_size", 16, "one point prompt at the centre of every patch_size x patch_size patch")
    flags.DEFINE_enum(
        "point_labels", "foreground", list(POINT_LABELS), "foreground: label 1 per point; reference: label k for point k, as the reference"
    )
    flags.DEFINE_enum("precision", "fp32", list(PRECISIONS), "SAM forward precision (autocast)")
    flags.DEFINE_enum(
        "attention", "sdpa", list(ATTENTIONS), "image-encoder attention: sdpa (fused kernels, same maths) or reference (segment_anything's)"
    )
    flags.DEFINE_boolean("compile", False, "torch.compile the image encoder (pays off on GPUs after a compile pause; off on CPU)")
    flags.DEFINE_integer("batch_size", 8, "images per image-encoder forward")
    flags.DEFINE_integer("points_per_batch", 196, "point prompts per mask-decoder call (lower it if memory runs out)")
    flags.DEFINE_boolean("overwrite", False, "recompute masks that already exist")
    flags.DEFINE_boolean("skip_bad_images", False, "log unreadable images to <out_data_path>/failed.txt and carry on")
    flags.DEFINE_enum(
        "mask_format", DEFAULT_MASK_FORMAT, list(MASK_FORMATS), "v2: each distinct mask once plus an index (small); v1: all masks"
    )
    flags.DEFINE_integer("num_processes", 1, "processes per node (GPUs on CUDA) sharing the images through Lightning DDP")
    flags.DEFINE_integer("num_nodes", 1, "nodes sharing the images through Lightning DDP")


def main(argv: Sequence[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}; every option is a --flag", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    given = FLAGS["sam_checkpoint"].present
    sam_flags = [f"--{name}" for name in ("sam_checkpoint", "sam_model_type") if FLAGS[name].present]
    if FLAGS.mask_source != "sam" and sam_flags:
        print(f"error: {sam_flags[0]} is a SAM option; --mask_source={FLAGS.mask_source} runs no SAM: drop it", file=sys.stderr)
        return 1
    checkpoint = FLAGS.sam_checkpoint if given else default_checkpoint(FLAGS.sam_model_type)
    random_weights = checkpoint is None or checkpoint.strip().lower() in ("", "none") or (
        FLAGS.sam_model_type in TEST_MODEL_TYPES and not given
    )
    try:
        run(
            in_data_path=FLAGS.in_data_path or f"datasets/imagenette2/{FLAGS.split}",
            out_data_path=FLAGS.out_data_path or f"datasets/imagenette2/{FLAGS.split}{MASKS_SUFFIX}",
            mask_source=FLAGS.mask_source,
            box_sizes=FLAGS.box_sizes,
            sam_model_type=FLAGS.sam_model_type,
            sam_checkpoint=None if random_weights else checkpoint,
            device=FLAGS.device or "auto",
            img_size=FLAGS.img_size,
            patch_size=FLAGS.patch_size,
            point_labels=FLAGS.point_labels,
            precision=FLAGS.precision,
            attention=FLAGS.attention,
            compile_encoder=FLAGS.compile,
            batch_size=FLAGS.batch_size,
            points_per_batch=FLAGS.points_per_batch,
            overwrite=FLAGS.overwrite,
            skip_bad_images=FLAGS.skip_bad_images,
            mask_format=FLAGS.mask_format,
            num_processes=FLAGS.num_processes,
            num_nodes=FLAGS.num_nodes,
        )
    except (InputError, ValueError) as exc:
        print(f"error: {user_error(exc)}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"patched_masks: {exc}", file=sys.stderr)
        return 128 + exc.signum
    return 0


def cli() -> None:
    """Console script ``partwhole-masks``."""
    define_flags()
    run_cli(main, __doc__, sys.modules[__name__])


if __name__ == "__main__":
    cli()
