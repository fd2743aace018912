"""The demo at the reference's path: ``python src/demo.py ...`` runs ``partwhole-demo ...`` (``src/partwhole_cli/demo.py``)."""

from partwhole_cli.demo import cli

if __name__ == "__main__":
    cli()
