"""The toy set's generator at the reference's path: ``python src/make_toy_dataset.py ...`` runs ``partwhole-toy ...`` (``src/partwhole_cli/make_toy.py``)."""

from partwhole_cli.make_toy import cli

if __name__ == "__main__":
    cli()
