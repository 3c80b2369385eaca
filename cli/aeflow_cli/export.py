"""``aeflow-cli export``: a model's image-to-anomaly-map network as ONNX or TorchScript, with its preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from aeflow_cli.common import run_guarded

__all__ = ["export"]


def _run(model: str, fmt: str | None, out: Path, overwrite: bool) -> dict[str, Any]:
    from monai_aeflow.export import export_format_for, export_model

    fmt = export_format_for(out, fmt)  # an unknown format fails before the model is read
    return export_model(model, out, fmt, overwrite=overwrite)


@click.command()
@click.argument("model")
@click.option(
    "--format",
    "fmt",
    default=None,
    metavar="onnx|torchscript",
    help="Export format (default: from the suffix of --out: .onnx; .ts or .pt for TorchScript).",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Exported file; its metadata goes beside it as OUT.json.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing exported file and its metadata.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
def export(model: str, fmt: str | None, out: Path, overwrite: bool, quiet: bool) -> None:
    """Export MODEL's image-to-anomaly-map network (a model file or a bundle folder) as ONNX or TorchScript.

    The network takes preprocessed slices (batch, channels, height, width) in [0, 1] and returns the anomaly
    map (batch, 1, height, width), as `aeflow-cli score` computes it. The batch axis is dynamic; height and
    width too where the network allows it. OUT.json records the input and output shapes, the preprocessing
    the network expects (orientation, spacing, intensity scaling, in-plane size, channels, size multiple),
    the map kind, the model's threshold if one is stored, and the largest difference from eager PyTorch on
    check inputs of another batch size (the export is refused above 1e-4). ONNX models are checked with
    onnx.checker and run with onnxruntime; they need the export extra (pip install 'monai-aeflow[export]').
    Nothing is written when the export fails, and existing files are kept unless --overwrite.
    """
    metadata = run_guarded(_run, model, fmt, out, overwrite)
    if not quiet:
        shape = ", ".join(str(d) for d in metadata["input"]["shape"])
        click.echo(
            f"{metadata['model']['model_name']} -> {out} ({metadata['format']}, input ({shape}), "
            f"max abs difference from PyTorch {metadata['parity']['max_abs_diff']:.2g}); metadata {out}.json"
        )
        for note in metadata["notes"]:
            click.echo(f"note: {note}", err=True)
