"""The model registry (``monai_aeflow.models``): one file per model, no import circle, every model works.

Every registered model is built at a CPU size, trained for one backward step, scored (finite score and map
of the right shapes) and round-tripped through a model file. The import tests check the layout: the model
files never import the registry (``monai_aeflow.models/__init__.py``) nor the deprecated
``monai_aeflow.baselines``, directly or through another module of the package.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import monai_aeflow.models as models
from monai_aeflow.checkpoint import load_model, save_model
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.models import (
    BUILTIN_MODELS,
    BUILTIN_SPECS,
    DEFAULT_MODEL,
    MODELS,
    ModelSpec,
    build_network,
    get_model_spec,
    model_name_of,
    register_model,
    trainable_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "monai_aeflow" / "models"
MODEL_MODULES = sorted(f"monai_aeflow.models.{p.stem}" for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")

# CPU-sized keyword arguments (the defaults are the papers' sizes); a model missing here is built with its defaults
SMALL: dict[str, dict] = {
    "aeflow": {"backbone": "resnet18", "backbone_weights": None, "flow_blocks": 2},
    "flowonly": {"backbone": "resnet18", "backbone_weights": None, "flow_blocks": 2},
    "ae": {"channels": [8, 16, 16, 16]},
    "vae": {"image_size": [32, 32], "channels": [8, 16, 16], "latent_dim": 8, "decoder_channels": [16, 16, 8, 8]},
    "pchvae": {"channels": [8, 16, 16, 16]},
    "vqvae": {"channels": [8, 16, 16], "num_embeddings": 16, "embedding_dim": 8},
    "vqgan": {"channels": [8, 16, 16], "num_embeddings": 16, "embedding_dim": 8},
    "dae": {"channels": [8, 16, 16]},
    "patchcore": {"backbone_weights": None},
}
SIZE = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(name: str) -> nn.Module:
    torch.manual_seed(0)
    net = build_network(name, **SMALL.get(name, {}))
    spec = get_model_spec(name)
    if spec.make_fitter is not None:  # a one-pass model (PatchCore) scores only once fitted
        spec.fit(net.eval(), [torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(7))])
    return net


def _map_kinds(spec: ModelSpec, net: nn.Module, x: torch.Tensor) -> list[str]:
    kinds = []
    for kind in ("residual", "ssim", "flow"):
        try:
            with torch.no_grad():
                spec.score(net, x[:1], map_kind=kind)
        except ValueError as err:
            assert "map kind" in str(err)
        else:
            kinds.append(kind)
    return kinds


# --------------------------------------------------------------------------------------------------------
# layout and imports
# --------------------------------------------------------------------------------------------------------


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imported(name: str) -> set[str]:
    """The ``monai_aeflow`` modules whose code runs when module ``name`` runs (imports at any nesting level,
    and the parent packages of each, except the registry itself when it is only the parent of a model file)."""
    path = _module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target.startswith("monai_aeflow") and _module_path(target) is not None:
                found.add(target)
                parts = target.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts)) if i != 2 or parts[1] != "models")
    return found


def _reachable(start: str) -> set[str]:
    """The ``monai_aeflow`` modules that importing ``start`` runs, transitively."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in _imported(todo.pop()):
            if dep not in seen and dep != start:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.parametrize("module", MODEL_MODULES)
def test_model_files_do_not_import_the_registry_or_the_shim(module):
    """A model file runs while the registry's ``__init__`` imports it: neither it nor anything it pulls in
    may need the registry (or the deprecated ``monai_aeflow.baselines``, which needs the registry)."""
    reached = _reachable(module)
    assert "monai_aeflow.models" not in reached, f"{module} imports the registry (monai_aeflow.models)"
    assert "monai_aeflow.baselines" not in reached
    outside = {dep for dep in reached if not dep.startswith("monai_aeflow.models")}
    for dep in outside:  # a module outside the package that imports any of it would close a circle
        assert not any(d.startswith("monai_aeflow.models") for d in _imported(dep)), dep


def test_the_registry_does_not_import_the_deprecated_module():
    assert "monai_aeflow.baselines" not in _reachable("monai_aeflow.models")


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module of the package imported first (every ``monai_aeflow`` module unloaded before), in a
    fresh interpreter; the deprecated ``monai_aeflow.baselines`` warns and nothing else does."""
    code = """
import importlib, json, sys, warnings
import torch, monai  # third-party modules stay loaded between the rounds; only ours are re-imported
result = {}
for name in sys.argv[1:]:
    for key in [k for k in sys.modules if k == "monai_aeflow" or k.startswith("monai_aeflow.")]:
        del sys.modules[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    registry = sys.modules["monai_aeflow.models"]
    result[name] = {"models": list(registry.MODELS), "warnings": [w.category.__name__ for w in caught
        if str(getattr(w, "filename", "")).find("monai_aeflow") >= 0 or "monai_aeflow" in str(w.message)]}
print(json.dumps(result))
"""
    names = ["monai_aeflow.models", *MODEL_MODULES, "monai_aeflow.baselines", "monai_aeflow.checkpoint"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        assert result[name]["models"] == list(BUILTIN_MODELS), name
        expected = ["DeprecationWarning"] if name == "monai_aeflow.baselines" else []
        assert result[name]["warnings"] == expected, name


def test_registry_order_and_exports():
    assert list(MODELS)[: len(BUILTIN_MODELS)] == list(BUILTIN_MODELS)
    assert len(set(BUILTIN_MODELS)) == len(BUILTIN_MODELS)
    assert BUILTIN_MODELS[-1] == DEFAULT_MODEL == get_model_spec(None).name
    assert set(BUILTIN_MODELS) == {
        "intensity",
        "ae",
        "dae",
        "vae",
        "pchvae",
        "vqvae",
        "vqgan",
        "patchcore",
        "flowonly",
        "aeflow",
    }
    for name in ("DEFAULT_MODEL", "MODELS", "ModelSpec", "build_network", "get_model_spec", "model_name_of"):
        assert name in models.__all__
    for name in ("register_model", "trainable_parameters", "aeflow_score"):
        assert name in models.__all__ and callable(getattr(models, name))
    for spec in BUILTIN_SPECS:  # each spec comes from its own model file
        module = spec.make_loss.__module__
        assert module.startswith("monai_aeflow.models.") and module in MODEL_MODULES, spec.name
        assert get_model_spec(spec.name.upper()) is spec
    with pytest.raises(ValueError, match="unknown model 'nope'; choose one of"):
        get_model_spec("nope")


@pytest.mark.parametrize("module", MODEL_MODULES)
def test_model_modules_are_documented_and_short(module):
    path = _module_path(module)
    assert len(path.read_text().splitlines()) <= 500
    mod = sys.modules[module]
    assert mod.__doc__ and isinstance(mod.__all__, list | tuple)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"


def test_size_multiple_comes_from_the_network():
    for spec in BUILTIN_SPECS:
        assert spec.size_multiple == getattr(spec.network_cls, "size_multiple", 16), spec.name
    for name in BUILTIN_MODELS:
        net = _small(name)
        assert get_model_spec(name).size_multiple_of(net) == getattr(net, "size_multiple", 16), name
    deeper = build_network("vqvae", channels=[8, 8, 8, 8], num_embeddings=8, embedding_dim=4)
    assert get_model_spec("vqvae").size_multiple_of(deeper) == 16
    assert get_model_spec("vqvae").size_multiple_of(nn.DataParallel(deeper)) == 16


def test_a_users_model_registers_builds_and_is_named():
    class Tiny(nn.Module):
        def __init__(self, in_channels: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_channels, in_channels, 1)
            self.hparams = {"in_channels": in_channels}

    class TinyFour(Tiny):
        size_multiple = 4

    try:
        spec = register_model(ModelSpec("tiny_registry_test", Tiny, lambda t: nn.MSELoss(), lambda *a, **k: {}))
        four = register_model(ModelSpec("tiny_four_registry_test", TinyFour, spec.make_loss, spec.score))
        assert spec.size_multiple == 16 and four.size_multiple == 4
        assert list(MODELS)[-2:] == ["tiny_registry_test", "tiny_four_registry_test"]
        net = build_network("tiny_registry_test", in_channels=2)
        assert model_name_of(net) == "tiny_registry_test" and net.hparams == {"in_channels": 2}
        assert trainable_parameters(net) == list(net.parameters())
    finally:
        MODELS.pop("tiny_registry_test", None)
        MODELS.pop("tiny_four_registry_test", None)
    with pytest.raises(ValueError, match="not a registered model"):
        model_name_of(net)


def test_the_deprecated_module_re_exports_its_names():
    import monai_aeflow.baselines as old
    from monai_aeflow.models import ae as ae_model
    from monai_aeflow.models import common, flow_only, intensity, pchvae, vae, vqvae

    assert old.BASELINE_NAMES == ("intensity", "ae", "dae", "vae", "pchvae", "vqvae", "vqgan", "patchcore", "flowonly")
    same = {
        "THESIS_VAE_CONFIG": vae.THESIS_VAE_CONFIG,
        "gaussian_kl": common.gaussian_kl,
        "likelihood_map": common.likelihood_map,
        "ReconstructionLoss": ae_model.ReconstructionLoss,
        "VAELoss": vae.VAELoss,
        "PCHVAELoss": pchvae.PCHVAELoss,
        "VQVAELoss": vqvae.VQVAELoss,
        "VQGANLoss": vqvae.VQGANLoss,
        "FlowOnlyLoss": flow_only.FlowOnlyLoss,
        "reconstruction_score": common.reconstruction_score,
        "vae_score": vae.vae_score,
        "pchvae_score": pchvae.pchvae_score,
        "flow_only_score": flow_only.flow_only_score,
        "intensity_score": intensity.intensity_score,
        "NothingToTrain": intensity.NothingToTrain,
    }
    for name, obj in same.items():
        assert getattr(old, name) is obj, name
    assert set(old.__all__) == set(same) - {"NothingToTrain"} | {"BASELINE_NAMES", "register_baselines"}
    spec = MODELS.pop("vae")
    try:
        old.register_baselines()
        assert MODELS["vae"] is spec
    finally:
        MODELS["vae"] = spec


# --------------------------------------------------------------------------------------------------------
# every registered model: build, one training step, score, model file
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_model_builds_trains_one_step_and_scores(name):
    spec = get_model_spec(name)
    net = _small(name)
    assert model_name_of(net) == name and type(net) is spec.network_cls
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    assert SIZE % spec.size_multiple_of(net) == 0
    params = trainable_parameters(net)
    loss_fn = spec.make_loss({"lr": 1e-3})
    net.train()
    if not params:  # nothing to train: the loss says so
        with pytest.raises(AEFlowInputError, match="nothing to train"):
            loss_fn(net(x), x)
    else:
        terms = loss_fn(net(x), x)
        assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
        assert all(torch.isfinite(v).all() for v in terms.values())
        terms["loss"].backward()
        grads = [p.grad for p in params if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    net.eval()
    kinds = _map_kinds(spec, net, x)
    assert "residual" in kinds
    for kind in kinds:
        with torch.no_grad():
            out = spec.score(net, x, beta=0.9, map_kind=kind)
        assert out["score"].shape == (3,)
        assert out["anomaly_map"].shape == (3, 1, SIZE, SIZE)
        assert out["recon"].shape == x.shape
        for key, value in out.items():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), (kind, key)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_model_round_trips_through_a_model_file(name, tmp_path):
    spec = get_model_spec(name)
    net = _small(name).eval()
    path = save_model(net, tmp_path / f"{name}.pt", config={"score": {"beta": 0.9}})
    loaded, ckpt = load_model(path)
    assert type(loaded) is type(net) and ckpt["config"]["model_name"] == name
    a_state, b_state = net.state_dict(), loaded.state_dict()
    assert a_state.keys() == b_state.keys()
    for key in a_state:
        assert torch.equal(a_state[key], b_state[key]), key
    x = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = spec.score(net, x), spec.score(loaded.eval(), x)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_scorer_pads_to_the_built_networks_multiple_not_the_class_default():
    """A VQ-VAE with four levels needs multiples of 16 (the class default is 8): 40 x 40 slices still score."""
    from monai_aeflow.inference.volume import score_slices
    from monai_aeflow.networks.vqvae import VQVAENet

    net = VQVAENet(channels=(4, 8, 8, 8), num_res_channels=(4, 8, 8, 8), num_embeddings=8, embedding_dim=4)
    assert net.size_multiple == 16 and type(net).size_multiple == 8
    out = score_slices(net, torch.rand(3, 1, 40, 40), batch_size=2)
    assert out["anomaly_map"].shape == (3, 1, 40, 40)
    assert torch.isfinite(out["anomaly_map"]).all()
