"""``aeflow-cli train``: train AE-FLOW or a baseline on the healthy slices of a dataset (or a synthetic cohort)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from aeflow_cli.common import run_guarded

__all__ = ["train", "backbone_options", "data_options"]

_DATASETS = ("brats", "ixi", "atlas", "folder")


BACKBONE_CHOICES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
DEFAULT_BACKBONE = "efficientnet_lite0"
BACKBONE_WEIGHTS_HELP = (
    "'auto' (ImageNet weights of --backbone, downloaded or from the torch hub cache; else the pretrained "
    "efficientnet_lite0, whose weights ship in a dependency, with a one-line notice), 'imagenet' (an error when "
    "unavailable), 'none' (random encoder) or a local .pth file."
)
BACKBONE_HELP = (
    "Encoder of aeflow / flowonly: efficientnet_lite0 (pretrained offline, CPU-sized), resnet18, wide_resnet50_2 "
    "(the paper's, for a GPU)."
)


def backbone_options(fn: Any) -> Any:
    """The encoder options shared by ``train``, ``compare`` and ``demo``."""
    fn = click.option("--backbone-weights", default="auto", show_default=True, help=BACKBONE_WEIGHTS_HELP)(fn)
    return click.option(
        "--backbone",
        default=DEFAULT_BACKBONE,
        show_default=True,
        type=click.Choice(BACKBONE_CHOICES),
        help=BACKBONE_HELP,
    )(fn)


def data_options(fn: Any) -> Any:
    """The data options shared by ``train`` and ``compare``."""
    options = [
        click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None, help="Dataset folder."),
        click.option(
            "--dataset",
            type=click.Choice(_DATASETS),
            default="brats",
            show_default=True,
            help="Layout of --data (indexer).",
        ),
        click.option(
            "--modality",
            default="flair",
            show_default=True,
            help="Modality for BraTS (flair, t1, t1c, t2; several joined by '+').",
        ),
        click.option(
            "--region",
            default="wt",
            show_default=True,
            type=click.Choice(["wt", "tc", "et"]),
            help="BraTS region of the validation/test labels: whole tumour, tumour core or enhancing tumour "
            "(training slices hold no tumour label of any kind).",
        ),
        click.option("--synthetic", is_flag=True, help="Use a generated synthetic brain MRI cohort instead of --data."),
        click.option(
            "--n-train", default=4, show_default=True, type=click.IntRange(1), help="Synthetic: training subjects."
        ),
        click.option(
            "--shape",
            default=(64, 64, 40),
            show_default=True,
            type=(int, int, int),
            help="Synthetic: volume shape (X Y Z).",
        ),
        click.option(
            "--contrast",
            default="flair",
            show_default=True,
            type=click.Choice(["flair", "t1"]),
            help="Synthetic: contrast.",
        ),
        click.option(
            "--split-file", type=click.Path(dir_okay=False), default=None, help="Split CSV (split, subject_id, ...)."
        ),
        click.option("--train-subjects", default=None, help="Comma-separated subject ids of the training split."),
        click.option("--val-subjects", default=None, help="Comma-separated subject ids of the validation split."),
        click.option("--test-subjects", default=None, help="Comma-separated subject ids of the test split."),
        click.option(
            "--fractions",
            default=(0.6, 0.2, 0.2),
            show_default=True,
            type=(float, float, float),
            help="Random subject split: train, validation, test fractions.",
        ),
        click.option("--split-seed", default=0, show_default=True, type=int, help="Seed of the random split."),
        click.option(
            "--spatial-size",
            default=(128, 128),
            show_default=True,
            type=(int, int),
            help="In-plane size after crop/pad (multiples of 16).",
        ),
        click.option("--spacing", default=None, type=float, help="Resample to this voxel size in mm first."),
        click.option(
            "--min-area-fraction",
            default=0.2,
            show_default=True,
            type=click.FloatRange(0, 1),
            help="Keep slices with at least this fraction of the largest brain area.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


# options of a dataset folder that a synthetic cohort does not use: (key, flag, default)
_DATASET_ONLY = (
    ("spatial_size", "--spatial-size", (128, 128)),
    ("spacing", "--spacing", None),
    ("fractions", "--fractions", (0.6, 0.2, 0.2)),
    ("split_file", "--split-file", None),
    ("train_subjects", "--train-subjects", None),
    ("val_subjects", "--val-subjects", None),
    ("test_subjects", "--test-subjects", None),
)


def data_config(opts: dict[str, Any]) -> Any:
    """Build a :class:`~monai_aeflow.data.datalists.DataConfig` from the data options."""
    from monai_aeflow.data.datalists import DataConfig, SyntheticCohortConfig
    from monai_aeflow.errors import AEFlowInputError

    if opts["synthetic"] and opts["data_dir"] is not None:
        raise AEFlowInputError("give either --data DIR or --synthetic, not both")
    if not opts["synthetic"] and opts["data_dir"] is None:
        raise AEFlowInputError("no data: give --data DIR (with --dataset) or --synthetic")
    if opts["synthetic"]:
        ignored = [flag for key, flag, default in _DATASET_ONLY if opts.get(key) not in (None, default)]
        if ignored:
            raise AEFlowInputError(
                f"{', '.join(ignored)} appl{'ies' if len(ignored) == 1 else 'y'} to --data; a --synthetic cohort is "
                "split by its own rule and its slices are the in-plane size of --shape"
            )
    named = {k: opts[f"{k}_subjects"] for k in ("train", "val", "test") if opts[f"{k}_subjects"]}
    subjects = {k: [s.strip() for s in v.split(",") if s.strip()] for k, v in named.items()} if named else None
    modality = opts["modality"]
    modality = modality.split("+") if modality and "+" in modality else modality
    return DataConfig(
        data_dir=opts["data_dir"],
        dataset=opts["dataset"],
        modality=modality,
        subjects=subjects,
        split_file=opts["split_file"],
        fractions=tuple(opts["fractions"]),
        split_seed=opts["split_seed"],
        spatial_size=tuple(opts["spatial_size"]),
        spacing=opts["spacing"],
        min_area_fraction=opts["min_area_fraction"],
        region=opts.get("region", "wt"),
        synthetic=SyntheticCohortConfig(n_train=opts["n_train"], shape=tuple(opts["shape"]), contrast=opts["contrast"]),
    )


# options that describe the run presentation, or how to start it, not the run itself: never stored
_NOT_STORED = ("resume", "overwrite", "quiet", "as_json")
# options a resumed run may change
_RESUME_MAY_CHANGE = ("epochs", "device", *_NOT_STORED)
_PATH_OPTIONS = ("data_dir", "split_file", "output_dir")


def _normalised(name: str, value: Any) -> Any:
    """A stored or given option value in a comparable form (lists, resolved paths)."""
    if isinstance(value, (tuple, list)):
        return [_normalised(name, v) for v in value]
    if name in _PATH_OPTIONS and value is not None:
        return str(Path(value).expanduser().resolve())
    return value


def _run_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The options that define a run, stored in its checkpoints (JSON-like values)."""
    return {k: _normalised(k, v) for k, v in opts.items() if k not in _NOT_STORED}


def _resume_options(opts: dict[str, Any], given: dict[str, str]) -> tuple[dict[str, Any], Path]:
    """The run's stored options with the allowed changes, and the checkpoint to resume from.

    ``given`` maps the options given on the command line to their flags. Raises AEFlowInputError on a checkpoint
    that cannot be resumed or on options that contradict the run's.
    """
    from monai_aeflow.engines.workflow import find_checkpoint, read_training_checkpoint
    from monai_aeflow.errors import AEFlowInputError, CheckpointError

    if opts["overwrite"]:
        raise AEFlowInputError("give either --resume (continue a run) or --overwrite (replace it), not both")
    resume = Path(opts["resume"])
    ckpt_path = find_checkpoint(resume)
    ckpt = read_training_checkpoint(ckpt_path)
    stored = ckpt["config"].get("training", {}).get("run_options")
    if not isinstance(stored, dict) or "model" not in stored:
        raise CheckpointError(
            "holds no aeflow-cli train options (written by another program); resume it with "
            "monai_aeflow.engines.TrainingConfig(resume=...)",
            path=ckpt_path,
        )
    run_dir = resume if resume.is_dir() else ckpt_path.parent
    stored = {**stored, "output_dir": _normalised("output_dir", run_dir)}
    conflicts = []
    for name, flag in given.items():
        if name in _RESUME_MAY_CHANGE or name not in stored:
            continue
        value, saved = _normalised(name, opts[name]), stored[name]
        if value != saved:
            conflicts.append(f"{flag} {value} (the run has {saved})")
    if conflicts:
        raise AEFlowInputError(
            f"options differ from the run's: {'; '.join(conflicts)}. A resumed run keeps its options "
            "(only --epochs and --device may change)",
            path=ckpt_path,
        )
    merged = {**opts, **{k: v for k, v in stored.items() if k in opts}}
    for name in _RESUME_MAY_CHANGE:
        if name in given:
            merged[name] = opts[name]
    merged["output_dir"] = str(run_dir)
    if "recipe" not in stored:  # a run stored without a recipe trained with the paper's loss
        merged["recipe"] = "paper"
    for name in ("model_arg", "loss_arg", "fractions", "shape", "spatial_size"):
        if isinstance(merged.get(name), list):
            merged[name] = tuple(merged[name])
    return merged, ckpt_path


def _interrupted(output_dir: str) -> str:
    """The one-line report of a Ctrl-C during training."""
    from monai_aeflow.engines.workflow import previous_run_files

    ckpts = [p for p in previous_run_files(output_dir) if p.name.startswith("checkpoint_")]
    if not ckpts:
        return "interrupted: stopped before the first checkpoint (end of epoch 1); nothing to resume, start again"
    return (
        f"interrupted: training stopped, the epochs up to the last checkpoint are kept in {output_dir}; resume "
        f"with aeflow-cli train --resume {shlex.quote(output_dir)}"
    )


def _run(opts: dict[str, Any], given: dict[str, str]) -> dict[str, Any]:
    from monai_aeflow.engines.run import parse_assignments, run_training
    from monai_aeflow.fileio import to_jsonable

    resume = None
    if opts["resume"] is not None:
        opts, resume = _resume_options(opts, given)
    say = (lambda msg: None) if opts["quiet"] or opts["as_json"] else click.echo
    if resume is not None:
        say(f"resuming {opts['output_dir']} from {resume.name}")
    try:
        summary = run_training(
            opts["model"],
            data_config(opts),
            opts["output_dir"],
            epochs=opts["epochs"],
            batch_size=opts["batch_size"],
            lr=opts["lr"],
            weight_decay=opts["weight_decay"],
            device=opts["device"],
            seed=opts["seed"],
            backbone=opts["backbone"],
            backbone_weights=opts["backbone_weights"],
            model_args=parse_assignments(opts["model_arg"]),
            loss_options=parse_assignments(opts["loss_arg"]),
            validate=not opts["no_validation"],
            progress=not (opts["quiet"] or opts["as_json"]),
            say=say,
            recipe=opts["recipe"],
            alpha=opts["alpha"],
            beta=opts["beta"],
            resume=resume,
            overwrite=opts["overwrite"],
            run_options=_run_options(opts),
        )
    except KeyboardInterrupt:
        click.echo(_interrupted(opts["output_dir"]), err=True)
        sys.exit(130)
    if opts["as_json"]:
        click.echo(json.dumps(to_jsonable(summary), indent=2))
    else:
        say(f"trained {summary['model']} in {summary['seconds']:.1f} s ({summary['epochs']} epochs)")
        if "best_val_auroc" in summary:
            say(f"best validation slice AUROC {summary['best_val_auroc']:.3f} (epoch {summary['best_epoch']})")
        say(f"model: {summary['model_path']}")
    return summary


class _RegistryHelpCommand(click.Command):
    """A command whose help text names the registry's built-in models (``{models}``), imported only for --help."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.help and "{models}" in self.help:
            from monai_aeflow.models import BUILTIN_MODELS

            self.help = self.help.replace("{models}", ", ".join(BUILTIN_MODELS))
        super().format_help_text(ctx, formatter)


@click.command(
    "train",
    cls=_RegistryHelpCommand,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="""Train a registered model (AE-FLOW or a baseline) on healthy axial slices.

The data are indexed (--data with --dataset) or generated (--synthetic), split by subject, preprocessed
(RAS, percentile scaling in the brain, crop/pad to --spatial-size) and the healthy slices of the training
subjects are used. The model file (model.pt: weights, architecture, preprocessing) goes to --out; with a
validation split the model with the best validation slice AUROC is kept. Models: {models} (a model
without trainable parameters is saved as it is).

A checkpoint (checkpoint_epoch=N.pt) is written atomically at the end of every epoch. After Ctrl-C (exit
code 130) or a crash, --resume RUN_DIR (or one of its checkpoints) continues the run with the options stored
in it (only --epochs and --device may change). --out must not hold a previous run unless --overwrite is given.

\b
Examples:
  aeflow-cli train --model vae --synthetic --out runs/vae --epochs 5
  aeflow-cli train --resume runs/vae
  aeflow-cli train --resume runs/vae --epochs 10
  aeflow-cli train --model aeflow --data /data/BraTS2021 --modality flair --out runs/aeflow
  aeflow-cli train --model vqgan --synthetic --out runs/vqgan --loss-arg adv_weight=0.1
""",
)
@click.option("--model", default="aeflow", show_default=True, help="Registered model name.")
@data_options
@click.option("--out", "output_dir", default="aeflow_run", show_default=True, help="Output folder.")
@click.option(
    "--resume",
    type=click.Path(),
    default=None,
    metavar="RUN_DIR|CHECKPOINT",
    help="Continue an interrupted run from its latest checkpoint (or from this checkpoint) with its stored options.",
)
@click.option("--overwrite", is_flag=True, help="Replace the model and checkpoints of a previous run in --out.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option("--weight-decay", default=1e-5, show_default=True, type=float)
@click.option(
    "--recipe",
    default="balanced",
    show_default=True,
    type=click.Choice(["balanced", "paper"]),  # monai_aeflow.models.aeflow.RECIPES (not imported for --help)
    help="AE-FLOW training recipe: balanced (flow weight 0.02, the decoder learns the anatomy) or paper (alpha 0.5).",
)
@click.option(
    "--alpha",
    default=None,
    type=click.FloatRange(0, 1),
    help="AE-FLOW flow loss weight  [default: the recipe's]",
)
@click.option("--beta", default=0.9, show_default=True, type=click.FloatRange(0, 1), help="AE-FLOW flow score weight.")
@backbone_options
@click.option("--model-arg", multiple=True, metavar="KEY=VALUE", help="Network argument (JSON value), repeatable.")
@click.option("--loss-arg", multiple=True, metavar="KEY=VALUE", help="Loss option (JSON value), repeatable.")
@click.option("--no-validation", is_flag=True, help="Keep the last model instead of the best on validation.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def train(**opts: Any) -> None:
    quiet = opts["quiet"] or opts["as_json"]
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    ctx = click.get_current_context()
    explicit = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    given = {p.name: p.opts[0] for p in ctx.command.params if ctx.get_parameter_source(p.name) in explicit}
    run_guarded(_run, opts, given)
