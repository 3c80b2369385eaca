"""Layout of the bundle glue: ``monai_aeflow.bundle`` keeps only what only bundles need.

The pieces that are not bundle-specific live in their own modules and stay importable from
``monai_aeflow.bundle``; every package reference of the bundle configurations resolves.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_PY = ROOT / "monai_aeflow" / "bundle.py"
CONFIGS = sorted((ROOT / "bundles").glob("*/configs/*.json"))

# the prepare_*_datalist functions moved to monai_aeflow/data/bundle_datalists.py; this is the size the move reached,
# plus build_bundle_network's model_file (the network a model file holds, for ckpt_export of any model).
MAX_BUNDLE_LINES = 360

MOVED = {
    "index_isic": "monai_aeflow.data.isic",
    "generate_synthetic_images": "monai_aeflow.data.synthetic",
    "check_data_files": "monai_aeflow.data.checks",
    "summary_writer": "monai_aeflow.engines.metrics",
    "loss_scalars": "monai_aeflow.engines.metrics",
    "MetricsWriter": "monai_aeflow.engines.metrics",
    "BatchRecorder": "monai_aeflow.engines.metrics",
    "write_scores_summary": "monai_aeflow.inference.outputs",
    "evaluate_volumes": "monai_aeflow.evaluation.volumes",
    "prepare_brain_mri_datalist": "monai_aeflow.data.bundle_datalists",
    "prepare_image_datalist": "monai_aeflow.data.bundle_datalists",
    "check_dataset_dir": "monai_aeflow.data.bundle_datalists",
    "is_synthetic_dataset": "monai_aeflow.data.bundle_datalists",
    "as_flag": "monai_aeflow.data.bundle_datalists",
    "masks_of": "monai_aeflow.data.bundle_datalists",
    "check_bundle_settings": "monai_aeflow.bundle_settings",
}
ALSO_FROM_DATA = (
    "index_isic",
    "generate_synthetic_images",
    "check_data_files",
    "prepare_brain_mri_datalist",
    "prepare_image_datalist",
)
DOTTED = re.compile(r"\bmonai_aeflow(?:\.[A-Za-z_]\w*)*")


def _resolve(dotted: str) -> Any:
    """Import the longest module prefix of ``dotted`` and get the remaining attributes."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        for name in parts[n:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def _strings(node: Any, key: str | None = None) -> list[tuple[str | None, str]]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(v, k)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v, key)]
    return [(key, node)] if isinstance(node, str) else []


def test_bundle_module_size() -> None:
    assert len(BUNDLE_PY.read_text().splitlines()) <= MAX_BUNDLE_LINES


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_names_are_the_same_objects_through_old_and_new_paths(name: str) -> None:
    bundle = importlib.import_module("monai_aeflow.bundle")
    home = importlib.import_module(MOVED[name])
    assert getattr(bundle, name) is getattr(home, name)
    assert getattr(home, name).__module__ == MOVED[name]
    assert name in bundle.__all__ and name in home.__all__
    if name in ALSO_FROM_DATA:
        assert getattr(importlib.import_module("monai_aeflow.data"), name) is getattr(home, name)


def test_bundle_keeps_its_own_glue() -> None:
    # the data lists (prepare_*_datalist) moved to monai_aeflow.data.bundle_datalists: checked through MOVED
    bundle = importlib.import_module("monai_aeflow.bundle")
    for name in (
        "AnomalyMapNet",
        "build_bundle_network",
        "install_error_hook",
        "initialize_flow",
    ):
        assert getattr(bundle, name).__module__ == "monai_aeflow.bundle"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_config_references_resolve(config: Path) -> None:
    data = json.loads(config.read_text())
    names = {m for _, s in _strings(data) for m in DOTTED.findall(s)}
    for name in sorted(names):
        _resolve(name)  # raises when a module or attribute is missing
    # configs name the new homes, not the re-exports of bundle.py
    stale = sorted(n for n in names if n.startswith("monai_aeflow.bundle.") and n.split(".")[-1] in MOVED)
    assert not stale, stale


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_config_targets_resolve(config: Path) -> None:
    from monai.bundle.config_item import ComponentLocator

    locator = ComponentLocator()
    for key, value in _strings(json.loads(config.read_text())):
        if key != "_target_" or value.startswith(("$", "@", "%")):
            continue
        if "." in value:
            assert callable(_resolve(value)), value
        else:
            assert locator.get_component_module_name(value), value
