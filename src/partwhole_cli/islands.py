"""``partwhole-islands``: ``partwhole-train --mode=islands``, a checkpoint's islands figures, scores and page.

The work is :mod:`partwhole.islands.checkpoint`; ``partwhole_cli.train.run_islands`` calls it with the
``--islands_*`` flags (``train.FLAG_OF`` names the flag of each of its settings in errors).
"""

from __future__ import annotations

import sys


def cli() -> None:
    """Console script ``partwhole-islands``: ``partwhole-train --mode=islands``."""
    from partwhole_cli import train

    sys.argv[1:1] = ["--mode=islands"]
    train.cli()
