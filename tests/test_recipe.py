"""AE-FLOW's training recipes: the default ``balanced`` and the paper's, reachable by name and recorded in model.pt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import norm

from aeflow_cli.main import cli
from monai_aeflow.checkpoint import load_model
from monai_aeflow.engines import TrainingConfig
from monai_aeflow.engines.trainer import AEFlowTrainer
from monai_aeflow.models.aeflow import DEFAULT_RECIPE, RECIPES, make_loss
from monai_aeflow.networks import AEFlow

pytestmark = pytest.mark.usefixtures("one_thread")

# AE-FLOW with a tiny flow on a tiny synthetic cohort (15 training slices of 32x32), one epoch
FAST = [
    "--model",
    "aeflow",
    "--synthetic",
    "--n-train",
    "1",
    "--shape",
    "32",
    "32",
    "24",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--backbone-weights",
    "none",
    "--model-arg",
    "flow_blocks=2",
    "--no-validation",
    "--device",
    "cpu",
    "--json",
    "-q",
]


def test_recipes_set_the_flow_weight_and_an_explicit_alpha_wins():
    assert DEFAULT_RECIPE == "balanced" and set(RECIPES) == {"balanced", "paper"}
    assert TrainingConfig().recipe == "balanced" and TrainingConfig().alpha == RECIPES["balanced"]["alpha"] < 0.5
    assert TrainingConfig(recipe="paper").alpha == 0.5
    assert TrainingConfig(recipe="paper", alpha=0.3).alpha == 0.3
    assert make_loss({}).alpha == RECIPES["balanced"]["alpha"]
    assert make_loss({"recipe": "paper"}).alpha == 0.5
    assert make_loss({"recipe": "paper", "alpha": None}).alpha == 0.5
    assert make_loss({"alpha": 0.5}).alpha == 0.5  # a bundle's explicit alpha is kept
    with pytest.raises(ValueError, match="unknown AE-FLOW training recipe 'fast'"):
        TrainingConfig(recipe="fast")
    with pytest.raises(ValueError, match="balanced, paper"):
        make_loss({"recipe": "fast"})
    # the engine's default loss is the default recipe's
    net = AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2)
    trainer = AEFlowTrainer("cpu", 1, [], net, torch.optim.Adam(net.trainable_parameters()))
    assert trainer.loss_function.alpha == RECIPES[DEFAULT_RECIPE]["alpha"]


@pytest.mark.parametrize("recipe", ["balanced", "paper"])
def test_recipe_loss_matches_an_independent_computation(recipe):
    """``alpha * NLL / D + (1 - alpha) * MSE`` with the NLL from scipy's normal log-density and the log-det."""
    torch.manual_seed(0)
    net = AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = net(x)
        got = make_loss({"recipe": recipe})(out, x)
    zp, log_det = out.z_prime.double().numpy(), out.log_det.double().numpy()
    dims = zp[0].size
    nll = np.mean([-(norm.logpdf(zp[i]).sum() + log_det[i]) / dims for i in range(len(zp))])
    mse = np.mean((out.x_rec.double().numpy() - x.double().numpy()) ** 2)
    alpha = RECIPES[recipe]["alpha"]
    assert float(got["loss_flow"]) == pytest.approx(nll, rel=1e-4)
    assert float(got["loss_recon"]) == pytest.approx(mse, rel=1e-5)
    assert float(got["loss"]) == pytest.approx(alpha * nll + (1 - alpha) * mse, rel=1e-4)


def _train(out, *extra: str) -> dict:
    res = CliRunner().invoke(cli, ["train", *FAST, "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    _, ckpt = load_model(summary["model_path"])
    return ckpt["config"]["training"]


def test_cli_train_records_the_recipe_and_reaches_the_papers_by_name(tmp_path):
    default = _train(tmp_path / "default")
    assert default["recipe"] == "balanced" and default["alpha"] == RECIPES["balanced"]["alpha"]
    paper = _train(tmp_path / "paper", "--recipe", "paper")
    assert paper["recipe"] == "paper" and paper["alpha"] == 0.5
    assert paper["run_options"]["recipe"] == "paper"
    mixed = _train(tmp_path / "mixed", "--recipe", "paper", "--alpha", "0.2")
    assert mixed["recipe"] == "paper" and mixed["alpha"] == 0.2
    res = CliRunner().invoke(cli, ["train", *FAST, "--out", str(tmp_path / "bad"), "--recipe", "fast"])
    assert res.exit_code == 2 and "fast" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "bad").exists()
