"""Model files whose stored configuration has values of the wrong type or range are refused when read.

Every consumer of a model file (``AnomalyScorer``, ``aeflow-cli score``, ``aeflow-cli evaluate --checkpoint``,
the bundles and the MONAI Label app) reads it through :func:`monai_aeflow.checkpoint.read_checkpoint`, so a
bad value gives one line naming the file and the key, before any network is built or any input is read.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from aeflow_cli.evaluate import evaluate
from aeflow_cli.score import score
from monai_aeflow.checkpoint import load_model, read_checkpoint, save_model
from monai_aeflow.engines import TrainingConfig
from monai_aeflow.errors import CheckpointError
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.inference import AnomalyScorer
from monai_aeflow.models import MODELS, build_network, get_model_spec

# CPU-sized keyword arguments of every registered model (the defaults are the papers' sizes).
SMALL = {
    "aeflow": {"backbone": "resnet18", "backbone_weights": None, "flow_blocks": 2},
    "ae": {"channels": [16, 32, 64, 128]},
    "vae": {"image_size": [64, 64], "channels": [16, 32, 64], "latent_dim": 64, "decoder_channels": [64, 64, 32, 16]},
    "pchvae": {"channels": [16, 32, 64, 128]},
    "vqvae": {"channels": [16, 32, 64], "num_embeddings": 64, "embedding_dim": 32},
    "vqgan": {"channels": [16, 32, 64], "num_embeddings": 64, "embedding_dim": 32},
    "flowonly": {"backbone": "resnet18", "backbone_weights": None, "flow_blocks": 2},
    "intensity": {},
    "dae": {"channels": [8, 16, 16]},
    "patchcore": {"backbone_weights": None},
}

VOLUME_PREPROCESSING = {"spatial_size": [64, 64], "percentiles": [1.0, 99.0], "spacing": None, "orientation": "RAS"}
IMAGE_PREPROCESSING = {"spatial_size": [64, 64], "percentiles": [1.0, 99.0], "grayscale": True}


def _registered() -> list[str]:
    get_model_spec(None)  # registers the built-in models
    return sorted(MODELS)


def _save(name: str, path: Path, preprocessing: dict, **training) -> Path:
    net = build_network(name, **SMALL[name])
    cfg = TrainingConfig(output_dir=str(path.parent), preprocessing=dict(preprocessing), **training).model_config()
    protocol = {"method": "greedy", "postprocessing": PostprocessConfig(median_size=3).to_dict()}
    return save_model(net, path, cfg, threshold=0.5, threshold_protocol=protocol)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("valid_models")
    return {name: _save(name, root / f"{name}.pt", VOLUME_PREPROCESSING) for name in ("aeflow", "ae")}


@pytest.fixture
def no_network_built(monkeypatch) -> list[str]:
    """Fails a test if any registered network is constructed; returns the names of those that were."""
    built: list[str] = []
    for name in _registered():
        cls = MODELS[name].network_cls

        @functools.wraps(cls.__init__)  # keeps the constructor's signature
        def boom(self, *args, _name=name, **kwargs):
            built.append(_name)
            raise AssertionError(f"a {_name} network was built from an invalid model file")

        monkeypatch.setattr(cls, "__init__", boom)
    return built


def _edited(src: Path, dst: Path, keys: tuple[str, ...], value) -> Path:
    """A copy of model file ``src`` with ``record[keys[0]][keys[1]]... = value`` (``...`` deletes the key)."""
    record = torch.load(src, map_location="cpu", weights_only=True)
    record = copy.deepcopy(record)
    parent = record
    for k in keys[:-1]:
        parent = parent[k]
    if value is ...:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value
    torch.save(record, dst)
    return dst


NAN, INF = float("nan"), float("inf")

# (model, key path in the file, bad value, what the message must name)
BAD = [
    ("aeflow", ("threshold",), "abc", "threshold"),
    ("aeflow", ("threshold",), NAN, "threshold"),
    ("aeflow", ("threshold",), INF, "threshold"),
    ("aeflow", ("threshold",), True, "threshold"),
    ("aeflow", ("config", "preprocessing"), "RAS", "preprocessing"),
    ("aeflow", ("config", "preprocessing", "spacing"), "1.0", "spacing"),
    ("aeflow", ("config", "preprocessing", "spacing"), [1.0, 1.0], "spacing"),
    ("aeflow", ("config", "preprocessing", "spacing"), [1.0, 0.0, 1.0], "spacing"),
    ("aeflow", ("config", "preprocessing", "spacing"), -2.0, "spacing"),
    ("aeflow", ("config", "preprocessing", "orientation"), "XYZ", "orientation"),
    ("aeflow", ("config", "preprocessing", "orientation"), "RRS", "orientation"),
    ("aeflow", ("config", "preprocessing", "orientation"), "RA", "orientation"),
    ("aeflow", ("config", "preprocessing", "orientation"), 3, "orientation"),
    ("aeflow", ("config", "preprocessing", "spatial_size"), [60, 64], "spatial_size"),
    ("aeflow", ("config", "preprocessing", "percentiles"), [99.0, 1.0], "percentiles"),
    ("aeflow", ("config", "preprocessing", "smoothing"), "yes", "smoothing"),
    ("aeflow", ("config", "score"), [0.9], "score"),
    ("aeflow", ("config", "score", "map_kind"), "heat", "map_kind"),
    ("aeflow", ("config", "score", "beta"), "0.9", "beta"),
    ("aeflow", ("config", "score", "beta"), 1.5, "beta"),
    ("aeflow", ("config", "score", "calibration"), {"flow_mean": 0.0}, "calibration"),
    ("aeflow", ("config", "model", "hidden_ratio"), 2000, "hidden_ratio"),
    ("aeflow", ("config", "model", "hidden_ratio"), 0.0, "hidden_ratio"),
    ("aeflow", ("config", "model", "flow_blocks"), 1000, "flow_blocks"),
    ("aeflow", ("config", "model", "flow_blocks"), 2.5, "flow_blocks"),
    ("aeflow", ("config", "model", "in_channels"), 2, "in_channels"),
    ("aeflow", ("config", "model", "backbone"), "vgg16", "backbone"),
    ("aeflow", ("config", "model", "subnet"), "mlp", "subnet"),
    ("aeflow", ("config", "model", "affine_clamping"), INF, "affine_clamping"),
    ("aeflow", ("config", "model", "actnorm"), "false", "actnorm"),
    ("aeflow", ("config", "model", "decoder_channels"), [512, 256], "decoder_channels"),
    ("aeflow", ("config", "model", "layers"), 3, "layers"),
    ("aeflow", ("config", "model_name"), "gan", "model_name"),
    ("aeflow", ("threshold_protocol", "postprocessing"), "median", "postprocessing"),
    ("aeflow", ("threshold_protocol", "postprocessing", "median_size"), 4, "median_size"),
    ("ae", ("config", "score", "map_kind"), "flow", "map_kind"),
    ("ae", ("config", "model", "channels"), [16, 32, 64], "channels"),
    ("ae", ("config", "model", "latent_channels"), 10**6, "latent_channels"),
]


def _bad_id(case) -> str:
    name, keys, value, _ = case
    return f"{name}-{'.'.join(keys)}={value!r}"


def _assert_one_line(message: str, path: Path, key: str) -> None:
    assert "\n" not in message.strip(), message
    assert str(path) in message, message
    assert key in message, message


@pytest.mark.parametrize("case", BAD, ids=[_bad_id(c) for c in BAD])
def test_bad_stored_value_is_refused_before_building_a_network(case, model_files, tmp_path, no_network_built):
    name, keys, value, key = case
    bad = _edited(model_files[name], tmp_path / "bad.pt", keys, value)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad)
    _assert_one_line(str(err.value), bad, key)
    with pytest.raises(CheckpointError) as err:
        AnomalyScorer(bad, device="cpu")
    _assert_one_line(str(err.value), bad, key)
    assert no_network_built == []


@pytest.fixture
def volume(tmp_path) -> Path:
    path = tmp_path / "input.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 4)).astype(np.float32), np.eye(4)), path)
    return path


@pytest.mark.parametrize(
    "keys, value, key",
    [
        (("threshold",), "abc", "threshold"),
        (("config", "preprocessing", "spacing"), "1.0", "spacing"),
        (("config", "model", "hidden_ratio"), 2000, "hidden_ratio"),
        (("config", "model_name"), "gan", "model_name"),
    ],
)
def test_score_cli_one_line_error_before_reading_data(
    keys, value, key, model_files, volume, tmp_path, no_network_built, monkeypatch
):
    read: list[str] = []
    monkeypatch.setattr(AnomalyScorer, "preprocess", lambda self, *a, **k: read.append("preprocess"))
    bad = _edited(model_files["aeflow"], tmp_path / "bad.pt", keys, value)
    before = bad.read_bytes()
    out = tmp_path / "scores"
    res = CliRunner().invoke(score, [str(volume), "-m", str(bad), "-o", str(out), "-q"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert err.startswith("Error:"), err
    _assert_one_line(err, bad, key)
    assert no_network_built == [] and read == []
    assert not out.exists()
    assert bad.read_bytes() == before


def test_evaluate_checkpoint_is_validated_up_front(model_files, tmp_path, no_network_built, monkeypatch):
    import monai_aeflow.evaluation as evaluation

    def never(*args, **kwargs):
        raise AssertionError("evaluation ran with an invalid model file")

    monkeypatch.setattr(evaluation, "find_cases", never)
    monkeypatch.setattr(evaluation, "evaluate_maps", never)
    bad = _edited(model_files["aeflow"], tmp_path / "bad.pt", ("config", "model", "hidden_ratio"), 2000)
    before = bad.read_bytes()
    for sub in ("maps", "labels", "masks"):
        (tmp_path / "split" / sub).mkdir(parents=True)
    split = str(tmp_path / "split")
    out = tmp_path / "report"
    res = CliRunner().invoke(evaluate, ["--val", split, "--test", split, "-o", str(out), "--checkpoint", str(bad)])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error:") and "Traceback" not in res.output
    _assert_one_line(err, bad, "hidden_ratio")
    assert not out.exists() and bad.read_bytes() == before


@pytest.mark.parametrize("name", _registered())
@pytest.mark.parametrize("preprocessing", [VOLUME_PREPROCESSING, IMAGE_PREPROCESSING], ids=["volume", "image2d"])
def test_every_registered_model_file_passes(name, preprocessing, tmp_path):
    assert set(SMALL) == set(_registered()), "add the new model to SMALL"
    map_kind = "flow" if name in ("aeflow", "flowonly") else "ssim"
    path = _save(name, tmp_path / f"{name}.pt", preprocessing, map_kind=map_kind)
    ckpt = read_checkpoint(path)
    assert ckpt["config"]["model_name"] == name
    net, _ = load_model(path)
    assert type(net) is MODELS[name].network_cls
    # Values of other types that mean the same thing are accepted (tuples, an int spacing, no orientation).
    edited = _edited(path, tmp_path / "alt.pt", ("config", "preprocessing", "spacing"), (1, 1.5, 2))
    edited = _edited(edited, edited, ("config", "preprocessing", "orientation"), None)
    edited = _edited(edited, edited, ("threshold",), 1)
    read_checkpoint(edited)


def test_every_stored_network_argument_has_a_rule():
    from monai_aeflow.model_config import NETWORK_RULES

    for name in _registered():
        net = build_network(name, **SMALL[name])
        assert set(net.hparams) <= set(NETWORK_RULES[name]), name


def test_trained_model_passes(small_volume_model):
    path = small_volume_model["model"]
    ckpt = read_checkpoint(path)
    assert ckpt["threshold"] == small_volume_model["threshold"]
    scorer = AnomalyScorer(path, device="cpu")
    assert scorer.threshold == small_volume_model["threshold"]
