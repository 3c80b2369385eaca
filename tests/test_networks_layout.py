"""Layout of :mod:`monai_aeflow.networks`: one architecture per module, unchanged state-dict keys, old imports.

``tests/data/network_state_keys.json`` was recorded from the networks before ``networks/baselines.py`` was split
into one module per architecture: model files saved before the split must still load, so the state-dict keys
and parameter shapes of every network must not change.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import monai_aeflow.networks as networks
from monai_aeflow.networks import AEFlow, AEFlowDecoder, FeatureEncoder, NormalizingFlow
from monai_aeflow.networks.baselines import (
    PCHVAE,
    ConvAutoEncoder,
    DenseVAE,
    FlowOnlyAEFlow,
    IntensityBaseline,
    VQGANNet,
    VQVAENet,
)

STATE_KEYS = json.loads((Path(__file__).parent / "data" / "network_state_keys.json").read_text())

# the same constructions as when the fixture was recorded
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "ConvAutoEncoder": lambda: ConvAutoEncoder(),
    "ConvAutoEncoder_small": lambda: ConvAutoEncoder(
        in_channels=3, channels=(8, 8, 16, 16), latent_channels=4, decoder_channels=(8, 8, 8)
    ),
    "DenseVAE": lambda: DenseVAE(),
    "DenseVAE_thesis": lambda: DenseVAE(image_size=(95, 79)),
    "PCHVAE": lambda: PCHVAE(),
    "VQVAENet": lambda: VQVAENet(),
    "VQGANNet": lambda: VQGANNet(num_res_channels=(16, 16, 16), num_embeddings=16, embedding_dim=8),
    "FlowOnlyAEFlow": lambda: FlowOnlyAEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2),
    "IntensityBaseline": lambda: IntensityBaseline(),
    "AEFlow": lambda: AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2),
    "AEFlowDecoder": lambda: AEFlowDecoder(256, 1),
    "FeatureEncoder": lambda: FeatureEncoder("resnet18", weights=None),
    "NormalizingFlow": lambda: NormalizingFlow(256, 2),
}

# the public names of ``monai_aeflow.networks.baselines`` and ``monai_aeflow.networks`` before the split
OLD_BASELINES_NAMES = [
    "ReconstructionOutput",
    "VAEOutput",
    "PCHVAEOutput",
    "VQOutput",
    "IntensityOutput",
    "ConvAutoEncoder",
    "DenseVAE",
    "PCHVAE",
    "VQVAENet",
    "VQGANNet",
    "FlowOnlyAEFlow",
    "IntensityBaseline",
    "median_filter_2d",
    "reparameterize",
]
OLD_NETWORKS_NAMES = [
    "AEFlow",
    "AEFlowOutput",
    "AEFlowDecoder",
    "BACKBONES",
    "FeatureEncoder",
    "NormalizingFlow",
    "ResNetFeatureExtractor",
    "load_backbone_weights",
]

NETWORK_MODULES = sorted(m.name for m in pkgutil.iter_modules(networks.__path__))


def test_fixture_covers_every_builder():
    assert set(STATE_KEYS) == set(BUILDERS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_state_dict_keys_and_shapes_are_unchanged(name):
    state = BUILDERS[name]().state_dict()
    got = {k: list(v.shape) for k, v in state.items()}
    assert list(got) == list(STATE_KEYS[name])  # same keys in the same order
    assert got == STATE_KEYS[name]


def test_old_state_dict_loads_strictly():
    """A state dict with the recorded keys and shapes (an old model file) loads into the new classes."""
    for name in ("ConvAutoEncoder_small", "PCHVAE", "VQGANNet", "IntensityBaseline"):
        net = BUILDERS[name]()
        old = {k: torch.zeros(s) for k, s in STATE_KEYS[name].items()}
        for k, v in net.state_dict().items():
            old[k] = old[k].to(v.dtype)
        net.load_state_dict(old, strict=True)


@pytest.mark.parametrize("module", NETWORK_MODULES)
def test_network_modules_are_small_and_declare_all(module):
    mod = importlib.import_module(f"monai_aeflow.networks.{module}")
    n_lines = len(Path(mod.__file__).read_text().splitlines())
    assert n_lines <= 500, f"monai_aeflow/networks/{module}.py has {n_lines} lines"
    assert isinstance(mod.__all__, list) and mod.__all__
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it lacks"


def test_old_import_paths_still_work():
    old = importlib.import_module("monai_aeflow.networks.baselines")
    assert sorted(old.__all__) == sorted(OLD_BASELINES_NAMES)
    for name in OLD_BASELINES_NAMES:
        obj = getattr(old, name)
        home = importlib.import_module(obj.__module__)
        assert getattr(home, name) is obj
        assert name in home.__all__
    for name in OLD_NETWORKS_NAMES:
        assert name in networks.__all__ and hasattr(networks, name)


def test_package_exports_the_baseline_networks():
    old = importlib.import_module("monai_aeflow.networks.baselines")
    for name in OLD_BASELINES_NAMES:
        if isinstance(getattr(old, name), type):
            assert getattr(networks, name) is getattr(old, name)
            assert name in networks.__all__


def test_one_architecture_per_module():
    expected = {
        "ConvAutoEncoder": "monai_aeflow.networks.autoencoder",
        "DenseVAE": "monai_aeflow.networks.vae",
        "PCHVAE": "monai_aeflow.networks.pchvae",
        "VQVAENet": "monai_aeflow.networks.vqvae",
        "VQGANNet": "monai_aeflow.networks.vqvae",
        "FlowOnlyAEFlow": "monai_aeflow.networks.flow_only",
        "IntensityBaseline": "monai_aeflow.networks.intensity",
        "AEFlow": "monai_aeflow.networks.aeflow",
    }
    for name, module in expected.items():
        assert getattr(networks, name).__module__ == module
