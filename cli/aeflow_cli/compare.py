"""``aeflow-cli compare``: train, score and evaluate several models on one dataset and protocol, one table."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from aeflow_cli.common import normalize_option, run_guarded
from aeflow_cli.train import backbone_options, data_config, data_options

__all__ = ["compare"]


def _default_models() -> str:
    """The default of --models: the registry's built-in models in table order (imported only when needed)."""
    from monai_aeflow.models import BUILTIN_MODELS

    return ",".join(BUILTIN_MODELS)


def _run(opts: dict[str, Any]) -> dict[str, Any]:
    from monai_aeflow.compare import CompareConfig, run_comparison
    from monai_aeflow.engines.run import parse_assignments
    from monai_aeflow.evaluation.postprocess import PostprocessConfig
    from monai_aeflow.fileio import to_jsonable

    quiet = opts["quiet"] or opts["as_json"]
    say = (lambda msg: None) if quiet else click.echo
    cfg = CompareConfig(
        output_dir=opts["output_dir"],
        models=[m for m in opts["models"].split(",") if m.strip()],
        data=data_config(opts),
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        device=opts["device"],
        seed=opts["seed"],
        backbone=opts["backbone"],
        backbone_weights=opts["backbone_weights"],
        model_args=parse_assignments(opts["model_arg"], nested=True),
        loss_options=parse_assignments(opts["loss_arg"], nested=True),
        map_kind=opts["map_kind"],
        postprocess=PostprocessConfig(
            normalize=opts["normalize"],
            residual=opts["residual"],
            erosion_iterations=opts["erosion"],
            median_size=opts["median_size"],
            min_component_size=opts["min_component_size"],
        ),
        threshold_method=opts["threshold_method"],
        n_bootstrap=opts["bootstrap"],
        n_thresholds=opts["grid_size"],
        progress=not quiet,
        overwrite=opts["overwrite"],
    )
    result = run_comparison(cfg, say=say)
    if opts["as_json"]:
        click.echo(json.dumps(to_jsonable({"rows": result["rows"], "paths": result["paths"]}), indent=2))
    else:
        click.echo(result["markdown"])
        click.echo(f"tables written to {result['paths']['markdown']} and {result['paths']['csv']}")
    for name, error in result.get("failed", {}).items():
        click.echo(f"Error: model {name} failed: {error}", err=True)
    return result


@click.command(
    "compare",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="""Train, score and evaluate several models on the same data and protocol; write one table.

Every model is trained on the healthy slices of the training subjects with the same epochs, batch size and
learning rate, scored slice by slice on the validation and test volumes, and evaluated with the brain MRI
protocol (threshold chosen on the validation split; test Dice, pixel / slice / volume AUROC and AUPRC).
comparison.md and comparison.csv (with training time and parameter count of each model) and
comparison.json go to --out (a folder that holds a previous comparison needs --overwrite). A model that
fails gets a row with its error, the others complete, and the exit code is 1.

\b
Examples:
  aeflow-cli compare --synthetic --out runs/compare --epochs 5
  aeflow-cli compare --models intensity,vae,aeflow --data /data/brats2015 --modality flair \\
      --train-subjects A,B --val-subjects C --test-subjects D --spacing 2 --out runs/brats
""",
)
@click.option(
    "--models",
    default=_default_models,
    show_default="every built-in model, intensity first and aeflow last",
    help="Comma-separated registered models, in table order.",
)
@data_options
@click.option("--out", "output_dir", default="aeflow_compare", show_default=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace the results and models of a previous comparison in --out.")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1), help="Training epochs of every model.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate of every model.")
@backbone_options
@click.option("--model-arg", multiple=True, metavar="MODEL.KEY=VALUE", help="Network argument, e.g. vae.latent_dim=64.")
@click.option("--loss-arg", multiple=True, metavar="MODEL.KEY=VALUE", help="Loss option, e.g. vqgan.adv_weight=0.1.")
@click.option(
    "--map-kind",
    default="residual",
    show_default=True,
    type=click.Choice(["residual", "ssim"]),
    help="Pixel map of reconstruction models (flow-only and intensity have one map).",
)
@normalize_option
@click.option(
    "--residual",
    default="absolute",
    show_default=True,
    type=click.Choice(["positive", "absolute"]),
    help="Keep the positive part (hyper-intense lesions) or the absolute value of the residual.",
)
@click.option("--erosion", default=3, show_default=True, type=click.IntRange(0), help="Brain-mask erosions per slice.")
@click.option("--median-size", default=5, show_default=True, type=click.IntRange(0), help="Median filter size.")
@click.option(
    "--min-component-size", default=7, show_default=True, type=click.IntRange(0), help="Remove smaller components."
)
@click.option(
    "--method",
    "threshold_method",
    default="sweep",
    show_default=True,
    type=click.Choice(["sweep", "greedy", "fpr"]),
    help="Threshold choice on the validation split: sweep (the exact validation-Dice maximum), greedy (the seed "
    "thesis' interval search) or fpr; the test Dice at the sweep and greedy thresholds are both in the table.",
)
@click.option("--bootstrap", default=200, show_default=True, type=click.IntRange(0), help="Bootstrap resamples.")
@click.option("--grid-size", default=4096, show_default=True, type=click.IntRange(2), help="Threshold grid of sweeps.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def compare(**opts: Any) -> None:
    quiet = opts["quiet"] or opts["as_json"]
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    result = run_guarded(_run, opts)
    if result.get("failed"):
        sys.exit(1)  # the tables hold the other models; the failed ones are named on stderr
