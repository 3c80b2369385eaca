"""Entry point of ``aeflow-cli``: a click group whose sub-commands live in their own modules."""

from __future__ import annotations

import click

from aeflow_cli.compare import compare
from aeflow_cli.demo import demo
from aeflow_cli.evaluate import evaluate
from aeflow_cli.export import export
from aeflow_cli.score import score
from aeflow_cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="monai-aeflow")
def cli() -> None:
    """AE-FLOW anomaly detection for 2D and 3D medical images (MONAI)."""


cli.add_command(demo)
cli.add_command(evaluate)
cli.add_command(score)
cli.add_command(train)
cli.add_command(compare)
cli.add_command(export)

if __name__ == "__main__":  # pragma: no cover
    cli()
