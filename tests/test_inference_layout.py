"""Layout of monai_aeflow.inference: small modules, old import paths, no engines import, one score formula."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monai_aeflow.inference as inference
from monai_aeflow.scores import combined_score, flow_score, image_score, recon_score

INFERENCE_DIR = Path(inference.__file__).parent

# name -> module that now defines it (``monai_aeflow.inference.pipeline`` re-exports all of them)
MOVED = {
    "AnomalyScorer": "scorer",
    "ScoreResult": "scorer",
    "resolve_model_path": "scorer",
    "preprocessing_from_config": "scorer",
    "BUNDLE_MODEL_FILES": "scorer",
    "VOLUME_SCORE_METHOD": "scorer",
    "SCORE_LOCK_NAME": "outputs",
    "output_name": "outputs",
    "output_paths": "outputs",
    "output_state": "outputs",
    "remove_leftovers": "outputs",
    "lock_output_folder": "outputs",
    "write_outputs": "outputs",
    "expand_inputs": "batch",
    "score_paths": "batch",
}


@pytest.mark.parametrize("path", sorted(INFERENCE_DIR.glob("*.py")), ids=lambda p: p.name)
def test_inference_modules_are_under_500_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 500, f"{path.name} has {lines} lines"


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_pipeline_imports_are_the_moved_objects(name):
    pipeline = importlib.import_module("monai_aeflow.inference.pipeline")
    home = importlib.import_module(f"monai_aeflow.inference.{MOVED[name]}")
    assert getattr(pipeline, name) is getattr(home, name)
    if name in inference.__all__:
        assert getattr(inference, name) is getattr(home, name)


def test_pipeline_all_names_resolve():
    pipeline = importlib.import_module("monai_aeflow.inference.pipeline")
    for name in pipeline.__all__:
        home = importlib.import_module(f"monai_aeflow.inference.{MOVED[name]}")
        assert getattr(pipeline, name) is getattr(home, name)
    for name in inference.__all__:
        assert getattr(inference, name) is not None


def test_resolve_device_has_one_definition():
    import monai_aeflow.device as device
    import monai_aeflow.engines as engines
    import monai_aeflow.engines.workflow as workflow

    assert workflow.resolve_device is device.resolve_device is engines.resolve_device
    assert device.resolve_device("cpu") == torch.device("cpu")


def test_inference_does_not_import_engines():
    code = (
        "import monai_aeflow.inference, sys; "
        "bad = [m for m in sys.modules if m.startswith('monai_aeflow.engines')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_combined_score_is_the_aeflow_formula():
    gen = torch.Generator().manual_seed(0)
    s_flow, s_recon = torch.rand(7, generator=gen), torch.rand(7, generator=gen)
    for beta in (0.0, 0.3, 0.9, 1.0):
        torch.testing.assert_close(combined_score(s_flow, s_recon, beta), beta * s_flow + (1 - beta) * s_recon)


def test_image_score_and_aeflow_score_use_the_formula():
    from monai_aeflow.models import aeflow_score, build_network

    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 8, 4, 4, generator=gen)
    x = torch.rand(3, 1, 32, 32, generator=gen)
    rec = torch.rand(3, 1, 32, 32, generator=gen)
    beta = 0.7
    by_hand = beta * flow_score(z) + (1 - beta) * recon_score(x, rec)
    torch.testing.assert_close(image_score(z, x, rec, beta=beta), by_hand)

    torch.manual_seed(0)
    net = build_network("aeflow", backbone="resnet18", backbone_weights=None, flow_blocks=2, in_channels=1).eval()
    with torch.no_grad():
        out = aeflow_score(net, x, beta=beta)
    torch.testing.assert_close(out["score"], beta * out["score_flow"] + (1 - beta) * out["score_recon"])


def test_score_slices_has_no_calibration_parameter():
    import inspect

    assert "calibration" not in inspect.signature(inference.score_slices).parameters
    assert "calibration" not in inspect.signature(inference.score_volume).parameters
