"""Layout of the comparison code: one module per concept, each under 500 lines, old import paths kept."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "monai_aeflow"

SMALL_MODULES = [
    "compare.py",
    "data/datalists.py",
    "engines/run.py",
    "engines/run_folder.py",
    "engines/workflow.py",
    "evaluation/scoring.py",
    "models/__init__.py",
]

# name -> the module that now defines it (each stays importable from monai_aeflow.compare)
MOVED = {
    "VOLUME_DATASETS": "monai_aeflow.data.datalists",
    "SyntheticCohortConfig": "monai_aeflow.data.datalists",
    "DataConfig": "monai_aeflow.data.datalists",
    "PreparedData": "monai_aeflow.data.datalists",
    "prepare_data": "monai_aeflow.data.datalists",
    "_synthetic_splits": "monai_aeflow.data.datalists",
    "_dataset_records": "monai_aeflow.data.datalists",
    "_split_records": "monai_aeflow.data.datalists",
    "_preprocess_volumes": "monai_aeflow.data.datalists",
    "build_model": "monai_aeflow.models",
    "count_parameters": "monai_aeflow.models",
    "train_model": "monai_aeflow.engines.run",
    "run_training": "monai_aeflow.engines.run",
    "parse_assignments": "monai_aeflow.engines.run",
    "score_cases": "monai_aeflow.evaluation.scoring",
    "evaluate_model": "monai_aeflow.evaluation.scoring",
}

# names that left monai_aeflow.engines.workflow for monai_aeflow.engines.run_folder
MOVED_FROM_WORKFLOW = [
    "MODEL_FILE",
    "find_checkpoint",
    "read_training_checkpoint",
    "open_resume_checkpoint",
    "checkpoint_epoch",
    "check_output_dir",
    "previous_run_files",
    "clear_previous_run",
]


@pytest.mark.parametrize("path", SMALL_MODULES)
def test_module_is_under_500_lines(path):
    n = len((PACKAGE / path).read_text().splitlines())
    assert n < 500, f"{path} has {n} lines"


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_names_resolve_from_the_old_path(name):
    compare = importlib.import_module("monai_aeflow.compare")
    home = importlib.import_module(MOVED[name])
    assert getattr(compare, name) is getattr(home, name)


def test_check_model_args_keeps_its_old_private_name():
    from monai_aeflow.compare import _check_model_args
    from monai_aeflow.models import check_model_args

    assert _check_model_args is check_model_args


@pytest.mark.parametrize("name", MOVED_FROM_WORKFLOW)
def test_run_folder_names_resolve_from_workflow_and_engines(name):
    import monai_aeflow.engines as engines
    import monai_aeflow.engines.run_folder as run_folder
    import monai_aeflow.engines.workflow as workflow

    assert getattr(workflow, name) is getattr(run_folder, name)
    if name != "MODEL_FILE":
        assert getattr(engines, name) is getattr(run_folder, name)


def test_engines_exports_training_and_model_neutral_names():
    import monai_aeflow.engines as engines
    from monai_aeflow.engines import run

    assert engines.AnomalyTrainer is engines.AEFlowTrainer
    assert engines.AnomalyEvaluator is engines.AEFlowEvaluator
    assert engines.run_training is run.run_training
    assert engines.train_model is run.train_model
    assert engines.parse_assignments is run.parse_assignments


def test_default_comparison_is_the_registry_order():
    from monai_aeflow.compare import DEFAULT_MODELS, CompareConfig
    from monai_aeflow.models import BUILTIN_MODELS

    assert DEFAULT_MODELS == BUILTIN_MODELS
    expected = ("intensity", "ae", "dae", "vae", "pchvae", "vqvae", "vqgan", "patchcore", "flowonly", "aeflow")
    assert DEFAULT_MODELS == expected
    assert tuple(CompareConfig().models) == BUILTIN_MODELS


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_train_cli_does_not_import_the_comparison_module():
    imported = _imported_modules(ROOT / "cli" / "aeflow_cli" / "train.py")
    assert not any(m == "monai_aeflow.compare" or m.startswith("monai_aeflow.compare.") for m in imported), imported


def test_demo_does_not_import_the_comparison_module():
    imported = _imported_modules(PACKAGE / "demo.py")
    assert not any(m == "monai_aeflow.compare" or m.startswith("monai_aeflow.compare.") for m in imported), imported


def test_demo_config_has_no_dead_extra_field():
    import dataclasses

    from monai_aeflow.demo import DemoConfig

    assert "extra" not in {f.name for f in dataclasses.fields(DemoConfig)}


def test_cli_lists_the_registry_models():
    from click.testing import CliRunner

    from aeflow_cli.main import cli
    from monai_aeflow.models import BUILTIN_MODELS

    res = CliRunner().invoke(cli, ["train", "--help"], terminal_width=400)
    assert res.exit_code == 0, res.output
    assert ", ".join(BUILTIN_MODELS) in " ".join(res.output.split())
    from aeflow_cli.compare import _default_models

    assert _default_models() == ",".join(BUILTIN_MODELS)


def test_no_double_dataclass_decorator():
    for path in PACKAGE.rglob("*.py"):
        lines = [line.strip() for line in path.read_text().splitlines()]
        for a, b in zip(lines, lines[1:], strict=False):
            assert not (a.startswith("@dataclass") and b.startswith("@dataclass")), path
