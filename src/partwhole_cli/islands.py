"""``partwhole-islands``: ``partwhole-train --mode=islands``, a checkpoint's islands figures, scores and page.

The work is :mod:`partwhole.islands.checkpoint`; ``partwhole_cli.train.run_islands`` calls it with the
``--islands_*`` flags (:data:`ISLANDS_FLAGS` names the flag of each of its settings).
"""

from __future__ import annotations

import sys

ISLANDS_FLAGS = {"split": "islands_split", "count": "islands_count", "images": "islands_images",
                 "animate": "islands_animate", "html": "islands_html"}
"""The flag of each setting of :func:`partwhole.islands.checkpoint.pick_images` / ``draw_islands_for_checkpoint``."""


def cli() -> None:
    """Console script ``partwhole-islands``: ``partwhole-train --mode=islands``."""
    from partwhole_cli import train

    sys.argv[1:1] = ["--mode=islands"]
    train.cli()
