"""Write the toy dataset (no download needed): images, ground truth and oracle stage-1 masks.

    python src/make_toy_dataset.py --out_dir datasets/toy --seed 0

Layout and definitions: docs/toy.md and ``partwhole.toy.dataset``. Reruns skip
finished images; ``--overwrite`` regenerates everything.
"""

from __future__ import annotations

import sys

from absl import flags

from partwhole.common.errors import InputError
from partwhole.toy.dataset import TOY_IMAGE_SIZE, TOY_PATCH_SIZE, generate_toy_dataset
from partwhole_cli import run_cli, user_error

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "datasets/toy", "Dataset root: writes {train,val}/, {train,val}_gt/, {train,val}_masks/.")
flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives byte-identical files.")
flags.DEFINE_integer("image_size", TOY_IMAGE_SIZE, "Image side in pixels (a multiple of --patch_size), e.g. 64 or 96.")
flags.DEFINE_integer("patch_size", TOY_PATCH_SIZE, "Patch side of the oracle-mask point grid (grid = image_size / patch_size).")
flags.DEFINE_integer("train_per_class", 200, "Training images per class.")
flags.DEFINE_integer("val_per_class", 50, "Validation images per class.")
flags.DEFINE_float("distractor_prob", 0.5, "Probability that an image also holds a one-part distractor object.")
flags.DEFINE_boolean("overwrite", False, "Regenerate files that already exist (otherwise they are skipped).")


def main(argv: list[str]) -> None:
    del argv
    try:
        generate_toy_dataset(  # logs its summary line
            FLAGS.out_dir,
            seed=FLAGS.seed,
            image_size=FLAGS.image_size,
            patch_size=FLAGS.patch_size,
            train_per_class=FLAGS.train_per_class,
            val_per_class=FLAGS.val_per_class,
            distractor_prob=FLAGS.distractor_prob,
            overwrite=FLAGS.overwrite,
        )
    except InputError as exc:
        sys.exit(f"error: {user_error(exc)}")


def cli() -> None:
    """Console script ``partwhole-toy``."""
    run_cli(main, __doc__, sys.modules[__name__])


if __name__ == "__main__":
    cli()
