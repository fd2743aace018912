"""Stage 1: SAM masks for every patch of every image of a folder.

Every image of ``<in_data_path>/<class>/`` is resized to ``img_size`` and
prompted with one point per ``patch_size`` patch; SAM's three masks per point
go to ``<out_data_path>/<class>/<stem>.pkl`` (see ``mask_io.save_masks``; each
distinct mask once, ``--mask_format=v1`` stores all of them). The teacher is SAM 1
(``--sam_model_type=vit_h|vit_l|vit_b``) or SAM 2.1 (``sam2.1_hiera_tiny|small|base_plus|large``);
the files are the same either way. ``--mask_source=boxes|full_image|superpixels`` writes masks that need no
SAM (``partwhole/masks/mask_sources.py``: nested boxes around each point, the whole image, or Felzenszwalb
segments at three scales), in the same format, as controls of the part-whole masks.
Finished files are skipped (``--overwrite`` recomputes), each file is written
atomically, and ``--num_processes``/``--num_nodes`` split the images over
Lightning Fabric DDP ranks.

Reference command (still works verbatim)::

    python src/hierarchical_masks/patched_masks.py --device=cuda:1 --split=val \\
        --in_data_path=datasets/imagenette2/val --out_data_path=datasets/imagenette2/val_masks \\
        --sam_checkpoint=sam_vit_h_4b8939.pth --sam_model_type=vit_h --img_size 224 --patch_size=16

This file is the wiring only: flags -> :class:`~partwhole.masks.masker_options.MaskerOptions` and
:class:`~partwhole.masks.mask_folder.MaskFolderConfig`, written out field by field ->
:func:`~partwhole.masks.mask_folder.run_mask_folder`; a library error ends with one ``error: --flag=...``
line (``partwhole_cli.user_error``) and exit 1. The stage itself (how to read, compute and save one
image) is ``partwhole/masks/mask_folder.py``, the teachers ``teachers.py``, the maths ``sam_points.py``
(SAM 1) and ``sam2_points.py`` (SAM 2.1).
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from partwhole.common.errors import InputError, SettingError
from partwhole.common.image_folders import MASKS_SUFFIX
from partwhole.common.mask_io import DEFAULT_MASK_FORMAT, MASK_FORMATS
from partwhole.common.per_image_runner import Interrupted
from partwhole.common.runtime import PRECISIONS
from partwhole.masks.mask_folder import MaskFolderConfig, no_sam_reason, run_mask_folder
from partwhole.masks.mask_sources import MASK_SOURCES
from partwhole.masks.masker_options import POINT_LABELS, MaskerOptions
from partwhole.masks.sam_attention import ATTENTIONS
from partwhole.masks.teachers import (
    DEFAULT_MODEL_TYPE,
    MODEL_TYPES,
    TEST_MODEL_TYPES,
    default_checkpoint,
)
from partwhole_cli import run_cli, user_error

FLAG_OF = {"compile_encoder": "compile"}  # the settings whose flag has another name


def define_flags() -> None:
    """The stage's flags (defined only when run as a script, so importing this module defines none)."""
    from absl import flags

    flags.DEFINE_string("device", None, "torch device: cpu, cuda, cuda:1 (default: cuda if a GPU is visible, else cpu)")
    flags.DEFINE_enum("mask_source", "sam", list(MASK_SOURCES),
                      "sam: SAM's masks (--sam_model_type); boxes: three nested squares around each point (--box_sizes); "
                      "full_image: the whole image at every level; superpixels: Felzenszwalb segments at three scales "
                      "(--superpixel_scales) (the last three need no SAM: controls of the part-whole masks)")
    flags.DEFINE_list("box_sizes", [], "--mask_source=boxes: the squares' sides in pixels of the resized image, level 0 to 2, "
                      "increasing, e.g. 32,96,192 (box_sizes.py --masks_path=<masks> matches another folder's mean areas)")
    flags.DEFINE_list("superpixel_scales", [], "--mask_source=superpixels: Felzenszwalb scales of levels 0 to 2, increasing "
                      "(larger: larger segments; default 50,200,800, chosen for 224 px images)")
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


def masker_options(FLAGS) -> MaskerOptions:
    """The masker's options, one flag each."""
    return MaskerOptions(img_size=FLAGS.img_size, patch_size=FLAGS.patch_size, precision=FLAGS.precision,
                         points_per_batch=FLAGS.points_per_batch, point_labels=FLAGS.point_labels,
                         attention=FLAGS.attention, compile_encoder=FLAGS.compile, box_sizes=tuple(FLAGS.box_sizes),
                         superpixel_scales=tuple(FLAGS.superpixel_scales))


def sam_checkpoint(FLAGS) -> str | None:
    """The checkpoint file: the flag, else the released file of ``--sam_model_type``; None for random weights
    (``none`` or empty, or a test model without the flag) and for mask sources without SAM (which refuse the flag)."""
    given = FLAGS["sam_checkpoint"].present
    if FLAGS.mask_source != "sam":
        for name in ("sam_checkpoint", "sam_model_type"):
            if FLAGS[name].present:
                raise SettingError(name, FLAGS[name].value, no_sam_reason(FLAGS.mask_source))
        return None
    checkpoint = FLAGS.sam_checkpoint if given else default_checkpoint(FLAGS.sam_model_type)
    if checkpoint is None or checkpoint.strip().lower() in ("", "none") or (FLAGS.sam_model_type in TEST_MODEL_TYPES and not given):
        return None
    return checkpoint


def folder_config(FLAGS) -> MaskFolderConfig:
    """The stage's settings, one flag each (the folders default to ``datasets/imagenette2/<split>``)."""
    return MaskFolderConfig(
        in_data_path=FLAGS.in_data_path or f"datasets/imagenette2/{FLAGS.split}",
        out_data_path=FLAGS.out_data_path or f"datasets/imagenette2/{FLAGS.split}{MASKS_SUFFIX}",
        mask_source=FLAGS.mask_source,
        sam_model_type=FLAGS.sam_model_type,
        sam_checkpoint=sam_checkpoint(FLAGS),
        masker=masker_options(FLAGS),
        batch_size=FLAGS.batch_size,
        overwrite=FLAGS.overwrite,
        skip_bad_images=FLAGS.skip_bad_images,
        mask_format=FLAGS.mask_format,
    )


def main(argv: Sequence[str]) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}; every option is a --flag", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_mask_folder(folder_config(FLAGS), device=FLAGS.device or "auto", num_processes=FLAGS.num_processes, num_nodes=FLAGS.num_nodes)
    except (InputError, ValueError) as exc:  # InputError: bad input or setting; ValueError: a bad device
        print(f"error: {user_error(exc, FLAG_OF)}", file=sys.stderr)
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
