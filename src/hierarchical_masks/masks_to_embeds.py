"""Stage 2 (embeddings of the masked images) at the reference's path: ``python src/hierarchical_masks/masks_to_embeds.py ...`` runs ``partwhole-embeds ...`` (``src/partwhole_cli/embeds.py``)."""

from partwhole_cli.embeds import cli

if __name__ == "__main__":
    cli()
