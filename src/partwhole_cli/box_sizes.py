"""``partwhole-box-sizes``: the ``--box_sizes`` of stage 1's boxes that match a folder of stage-1 masks in area per level.

    partwhole-box-sizes --masks_path=datasets/toy/train_masks   # prints e.g. --box_sizes=48,78,79
"""

from __future__ import annotations

import sys

from absl import flags

from partwhole.common.errors import InputError
from partwhole.masks.box_sizes import matched_box_sizes
from partwhole_cli import run_cli, user_error


def main(argv) -> int:
    del argv
    FLAGS = flags.FLAGS
    try:
        sides, areas, boxes = matched_box_sizes(FLAGS.masks_path)
    except InputError as exc:
        print(f"error: {user_error(exc)}", file=sys.stderr)
        return 1
    print(f"mean mask area per level {', '.join(f'{a:.1f}' for a in areas)} px; boxes of these sides, clipped: "
          f"{', '.join(f'{b:.1f}' for b in boxes)} px")
    print(f"--box_sizes={','.join(map(str, sides))}")
    return 0


def cli() -> None:
    """Console script ``partwhole-box-sizes``."""
    flags.DEFINE_string("masks_path", None, "Stage-1 mask folder <masks_path>/<class>/<image>.pkl whose mean areas the boxes match.")
    flags.mark_flag_as_required("masks_path")
    run_cli(main, __doc__, sys.modules[__name__])


if __name__ == "__main__":
    cli()
