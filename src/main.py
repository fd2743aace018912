"""Stage 3 (the Agglomerator: pretrain, fine-tune, test, islands) at the reference's path: ``python src/main.py ...`` runs ``partwhole-train ...`` (``src/partwhole_cli/train.py``)."""

from partwhole_cli.train import cli

if __name__ == "__main__":
    cli()
