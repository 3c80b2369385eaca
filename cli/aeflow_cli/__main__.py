"""``python -m aeflow_cli`` (and ``torchrun ... -m aeflow_cli score ...``): the ``aeflow-cli`` application."""

from aeflow_cli.main import cli

if __name__ == "__main__":  # pragma: no cover
    cli(prog_name="aeflow-cli")
