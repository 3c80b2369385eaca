"""``aeflow-cli demo``: train AE-FLOW on a generated synthetic cohort and map the anomalies of a test volume."""

from __future__ import annotations

import logging

import click

from aeflow_cli.common import run_guarded


@click.command()
@click.option("--out", "output_dir", default="aeflow_demo", show_default=True, help="Output folder.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--n-train", default=6, show_default=True, type=click.IntRange(1), help="Healthy training subjects.")
@click.option("--shape", default=(64, 64, 48), show_default=True, type=(int, int, int), help="Volume shape (X Y Z).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option(
    "--backbone",
    default="resnet18",
    show_default=True,
    type=click.Choice(["resnet18", "wide_resnet50_2", "efficientnet_lite0"]),
)
@click.option(
    "--backbone-weights",
    default="auto",
    show_default=True,
    help="'auto' (ImageNet if downloadable, else random), 'imagenet', 'none' (random) or a local .pth file.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bars or training logs.")
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
) -> None:
    """Generate synthetic brain MRI, train AE-FLOW on healthy slices, and map lesions of test volumes."""
    from monai_aeflow.demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    cfg = DemoConfig(
        output_dir=output_dir,
        n_train=n_train,
        shape=shape,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        backbone=backbone,
        backbone_weights=backbone_weights,
        device=device,
        seed=seed,
        progress=not quiet,
    )
    run_guarded(run_demo, cfg, say=click.echo)
