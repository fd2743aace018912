"""Stage 1 (SAM masks per image) at the reference's path: ``python src/hierarchical_masks/patched_masks.py ...`` runs ``partwhole-masks ...`` (``src/partwhole_cli/masks.py``)."""

from partwhole_cli.masks import cli

if __name__ == "__main__":
    cli()
