"""``aeflow-cli demo``: train AE-FLOW on a generated synthetic cohort and map the anomalies of test volumes."""

from __future__ import annotations

import logging

import click

from aeflow_cli.common import run_guarded
from aeflow_cli.train import backbone_options


@click.command()
@click.option("--out", "output_dir", default="aeflow_demo", show_default=True, help="Output folder.")
@click.option("--epochs", default=4, show_default=True, type=click.IntRange(1))
@click.option("--n-train", default=6, show_default=True, type=click.IntRange(1), help="Healthy training subjects.")
@click.option(
    "--shape",
    default=(128, 128, 32),
    show_default=True,
    type=(click.IntRange(16), click.IntRange(16), click.IntRange(16)),
    help="Volume shape (X Y Z); in-plane sizes multiples of 16.",
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=2e-3, show_default=True, type=float)
@backbone_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bars or training logs.")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo run in --out (model, checkpoints, results).")
def demo(
    output_dir: str,
    epochs: int,
    n_train: int,
    shape: tuple[int, int, int],
    batch_size: int,
    lr: float,
    backbone: str,
    backbone_weights: str,
    device: str,
    seed: int,
    quiet: bool,
    overwrite: bool,
) -> None:
    """Generate synthetic brain MRI, train AE-FLOW on healthy slices, and map lesions of test volumes.

    The test volumes are also scored by the intensity baseline (the image itself, median-filtered); both sets of
    metrics go to results/metrics.json.
    """
    from monai_aeflow.demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    # the field of view stays that of the default geometry (192 x 192 x 120 mm) whatever the grid
    spacing = (192.0 / shape[0], 192.0 / shape[1], 120.0 / shape[2])
    cfg = DemoConfig(
        output_dir=output_dir,
        n_train=n_train,
        shape=shape,
        spacing=spacing,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        backbone=backbone,
        backbone_weights=backbone_weights,
        device=device,
        seed=seed,
        progress=not quiet,
        overwrite=overwrite,
    )
    run_guarded(run_demo, cfg, say=click.echo)
