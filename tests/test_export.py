"""``aeflow-cli export`` and :mod:`monai_aeflow.export`: ONNX / TorchScript files that agree with eager PyTorch.

Every registered model is exported in both formats and run by onnxruntime (CPU) or ``torch.jit.load`` on a
batch of a size that was neither traced nor checked by the exporter; the reference is the eager
:class:`~monai_aeflow.bundle.AnomalyMapNet` of the same model file. A small AE-FLOW trained for a few steps on
synthetic healthy slices is also compared on synthetic lesioned brain slices and on real BraTS slices (skipped
without the shared data folder). The command's user errors are one line with exit code 2 and write nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from aeflow_cli.main import cli
from monai_aeflow.bundle import AnomalyMapNet
from monai_aeflow.checkpoint import load_model, save_model
from monai_aeflow.export import PARITY_TOLERANCE, export_model, metadata_path
from monai_aeflow.models import BUILTIN_MODELS, MODELS, ModelSpec, build_network, get_model_spec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# CPU-sized keyword arguments of every built-in model (the defaults are the papers' sizes)
SMALL: dict[str, dict[str, Any]] = {
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
BATCH = 5  # neither the exporter's traced batch (2) nor its check batch (3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _eager(model: Path) -> AnomalyMapNet:
    network, ckpt = load_model(model)
    score = ckpt["config"].get("score") or {}
    return AnomalyMapNet(network, map_kind=score.get("map_kind", "residual"), beta=score.get("beta", 0.9)).eval()


def _reference(model: Path, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return _eager(model)(x).numpy()


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.jit.load(str(path)).eval()(x).numpy()


RUNNERS = {"onnx": _run_onnx, "torchscript": _run_torchscript}
SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}


def _assert_parity(fmt: str, exported: Path, model: Path, x: torch.Tensor) -> float:
    got, expected = RUNNERS[fmt](exported, x), _reference(model, x)
    assert got.shape == expected.shape == (x.shape[0], 1, *x.shape[2:])
    diff = float(np.abs(got - expected).max())
    assert diff <= PARITY_TOLERANCE, diff
    return diff


def _small_model(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(0)
    net = build_network(name, **SMALL.get(name, {}))
    if hasattr(net, "set_memory_bank"):  # PatchCore: a fitted memory bank of random features
        net.set_memory_bank(torch.randn(64, net.feature_channels))
    path = tmp_path / f"{name}.pt"
    save_model(net, path, {"preprocessing": {"spatial_size": [SIZE, SIZE], "spacing": 1.5}})
    return path


# --------------------------------------------------------------------------------------------------------
# every registered model, both formats
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_every_registered_model_exports_and_matches_eager_pytorch(
    tmp_path: Path, name: str, fmt: str, request: pytest.FixtureRequest
) -> None:
    if name == "aeflow":  # exported once, trained, by the fixture (an ONNX export takes seconds)
        trained = request.getfixturevalue("trained")
        model, out, meta, size = trained["model"], trained["exported"][fmt], trained["meta"][fmt], 64
        assert meta["threshold"] == 0.125
    else:
        model, out, size = _small_model(tmp_path, name), tmp_path / f"{name}{SUFFIX[fmt]}", SIZE
        meta = export_model(model, out, fmt)
        assert meta["threshold"] is None
    assert json.loads(metadata_path(out).read_text()) == json.loads(json.dumps(meta))
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert meta["model"]["model_name"] == name and meta["format"] == fmt

    net = build_network(name, **SMALL.get(name, {}))
    shape = meta["input"]["shape"]
    assert shape[0] == "batch" and shape[1] == 1
    assert meta["preprocessing"]["channels"] == 1 and meta["preprocessing"]["in_plane_size"] == [size, size]
    assert meta["preprocessing"]["size_multiple"] == get_model_spec(name).size_multiple_of(net)
    assert meta["preprocessing"]["spacing"] == 1.5 and meta["preprocessing"]["orientation"] == "RAS"
    assert meta["output"]["map_kind"] == "residual"
    if fmt == "onnx":
        onnx.checker.check_model(str(out), full_check=True)
        graph_input = onnx.load(str(out)).graph.input[0]
        assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == shape

    torch.manual_seed(1)
    _assert_parity(fmt, out, model, torch.rand(BATCH, 1, size, size))
    if shape[2:] == ["height", "width"]:
        multiple = meta["preprocessing"]["size_multiple"]
        h, w = size + multiple * max(1, 48 // multiple), size + multiple * max(1, 16 // multiple)
        _assert_parity(fmt, out, model, torch.rand(2, 1, h, w))
    else:
        assert shape[2:] == [size, size] and meta["notes"]
    if name in ("aeflow", "ae"):  # convolutional all the way: the exported size must not be fixed
        assert shape[2:] == ["height", "width"], meta["notes"]


def test_export_uses_the_stored_map_kind_and_channels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network("aeflow", **SMALL["aeflow"], in_channels=3)
    model = tmp_path / "flow.pt"
    save_model(net, model, {"preprocessing": {"spatial_size": [SIZE, SIZE]}, "score": {"map_kind": "flow"}})
    out = tmp_path / "flow.pt.ts"
    meta = export_model(model, out)  # format from the suffix
    assert meta["format"] == "torchscript" and meta["output"]["map_kind"] == "flow"
    assert meta["input"]["shape"][:2] == ["batch", 3]
    x = torch.rand(BATCH, 3, SIZE, SIZE)
    got = _run_torchscript(out, x)
    with torch.no_grad():
        expected = AnomalyMapNet(load_model(model)[0], map_kind="flow").eval()(x).numpy()
        residual = AnomalyMapNet(load_model(model)[0], map_kind="residual").eval()(x).numpy()
    assert float(np.abs(got - expected).max()) <= PARITY_TOLERANCE
    assert float(np.abs(got - residual).max()) > 10 * PARITY_TOLERANCE  # the stored map kind, not the default


# --------------------------------------------------------------------------------------------------------
# a trained AE-FLOW on realistic slices
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small AE-FLOW trained for 30 steps on synthetic healthy 64x64 slices, with a stored threshold."""
    from monai_aeflow.data.synthetic import make_slices

    root = tmp_path_factory.mktemp("export_trained")
    healthy = torch.as_tensor(make_slices(2, lesion=False, seed=3, shape=(64, 64, 32))["image"]).float()
    lesioned = make_slices(1, lesion=True, seed=3, shape=(64, 64, 32))
    torch.manual_seed(0)
    net = build_network("aeflow", **SMALL["aeflow"])
    net.initialize_flow(healthy[:32])
    loss_fn = get_model_spec("aeflow").make_loss({})
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = healthy[torch.randint(len(healthy), (8,), generator=gen)]
        loss = loss_fn(net(x), x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model = root / "model.pt"
    save_model(
        net.eval(),
        model,
        {"preprocessing": {"spatial_size": [64, 64], "percentiles": [1.0, 99.0], "spacing": 1.5}},
        threshold=0.125,
        threshold_protocol={"method": "given", "postprocessing": {"residual": "positive"}},
    )
    exported = {fmt: root / f"model{SUFFIX[fmt]}" for fmt in RUNNERS}
    metas = {fmt: export_model(model, path, fmt) for fmt, path in exported.items()}
    return {"model": model, "exported": exported, "meta": metas, "lesioned": lesioned}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_trained_aeflow_matches_eager_on_synthetic_brain_slices(trained: dict[str, Any], fmt: str) -> None:
    images, labels = trained["lesioned"]["image"], trained["lesioned"]["label"]
    order = np.argsort(-labels.reshape(len(labels), -1).sum(1))[:BATCH]  # the slices with the most lesion
    x = torch.as_tensor(images[order]).float()
    assert x.shape[1:] == (1, 64, 64) and float(x.max()) > 0.5
    _assert_parity(fmt, trained["exported"][fmt], trained["model"], x)
    meta = trained["meta"][fmt]
    assert meta["threshold"] == 0.125 and meta["threshold_protocol"]["postprocessing"] == {"residual": "positive"}
    assert meta["preprocessing"]["intensity"]["percentiles"] == [1.0, 99.0]
    assert meta["parity"]["max_abs_diff"] <= PARITY_TOLERANCE


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_trained_aeflow_matches_eager_on_real_brats_slices(trained: dict[str, Any], fmt: str, shared_data) -> None:
    from monai_aeflow.data.preprocessing import build_volume_preprocessing

    case = shared_data / "brats2015_dev" / "brats_2013_pat0003_1"
    if not case.is_dir():
        pytest.skip(f"{case} not present")
    data = build_volume_preprocessing(spatial_size=(128, 128), spacing=2.0)(
        {"image": str(case / "Flair_subtrMeanDivStd.nii.gz"), "mask": str(case / "brainmask.nii.gz"), "label": None}
    )
    volume = torch.as_tensor(data["image"]).float()  # (1, 128, 128, Z): another size than the exported 64 x 64
    brain = torch.as_tensor(data["mask"]).flatten(0, 2).sum(0)
    slices = torch.argsort(brain, descending=True)[:3]
    x = volume[..., slices].permute(3, 0, 1, 2).contiguous()
    assert x.shape == (3, 1, 128, 128) and float(x.max()) > 0.9
    _assert_parity(fmt, trained["exported"][fmt], trained["model"], x)


# --------------------------------------------------------------------------------------------------------
# the command: bundles, overwrite, one-line errors, nothing half-written
# --------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["export", *args])


def _one_line_error(result: Any, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_cli_exports_a_bundle_folder_and_overwrites_only_when_asked(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    model = _small_model(tmp_path, "ae")
    (bundle / "models" / "model.pt").write_bytes(model.read_bytes())
    out = tmp_path / "exported" / "ae.ts"
    result = _cli(str(bundle), "--format", "torchscript", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "ae ->" in result.output and metadata_path(out).is_file()
    before = out.read_bytes(), metadata_path(out).read_text()

    _one_line_error(_cli(str(bundle), "--format", "torchscript", "--out", str(out)), "--overwrite", str(out))
    assert (out.read_bytes(), metadata_path(out).read_text()) == before
    metadata_path(out).unlink()  # an exported file whose metadata went missing is still not replaced
    _one_line_error(_cli(str(bundle), "--out", str(out), "-q"), "--overwrite", str(out))
    assert out.read_bytes() == before[0] and not metadata_path(out).exists()

    result = _cli(str(bundle), "--out", str(out), "--overwrite", "--quiet")
    assert result.exit_code == 0 and result.output == ""
    meta = json.loads(metadata_path(out).read_text())
    assert meta["model"]["file"] == str((bundle / "models" / "model.pt").resolve())
    assert _run_torchscript(out, torch.rand(4, 1, 48, 64)).shape == (4, 1, 48, 64)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ae.ts", "ae.ts.json"]


def test_cli_refuses_bad_model_files_and_formats_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    out = tmp_path / "out" / "net.onnx"
    _one_line_error(_cli(str(garbage), "--format", "onnx", "--out", str(out)), str(garbage))
    _one_line_error(_cli(str(tmp_path / "missing.pt"), "--out", str(out)), "missing.pt")
    _one_line_error(_cli(str(tmp_path), "--out", str(out)), "no trained model")
    model = _small_model(tmp_path, "ae")
    _one_line_error(_cli(str(model), "--format", "tflite", "--out", str(out)), "tflite", "onnx", "torchscript")
    _one_line_error(_cli(str(model), "--out", str(tmp_path / "net.bin")), "--format", ".bin")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "net.bin").exists()


class _NumpyOutput(NamedTuple):
    x_rec: torch.Tensor


class _NumpyNet(nn.Module):
    """A network whose map goes through NumPy (a trace keeps it as a constant) and singular values (no ONNX op)."""

    size_multiple = 1

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.hparams = {"in_channels": in_channels}

    def forward(self, x: torch.Tensor) -> _NumpyOutput:
        return _NumpyOutput(torch.sigmoid(self.conv(x)))


def _numpy_score(network: nn.Module, x: torch.Tensor, beta: float = 0.9, map_kind: str = "residual") -> dict:
    rec = network(x).x_rec
    amap = torch.from_numpy(np.abs(x.detach().numpy() - rec.detach().numpy()).mean(1, keepdims=True))
    amap = amap * (1.0 + 0.0 * torch.linalg.svdvals(x[:, 0]).amax(1).reshape(-1, 1, 1, 1))  # no ONNX operator
    return {"score": amap.flatten(1).mean(1), "anomaly_map": amap, "recon": rec}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_model_that_cannot_be_exported_is_named_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    spec = ModelSpec(name="numpymap", network_cls=_NumpyNet, make_loss=lambda t: nn.MSELoss(), score=_numpy_score)
    monkeypatch.setitem(MODELS, "numpymap", spec)
    model = tmp_path / "numpymap.pt"
    save_model(_NumpyNet(), model)
    out = tmp_path / "out" / f"net{SUFFIX[fmt]}"
    _one_line_error(_cli(str(model), "--format", fmt, "--out", str(out)), "'numpymap'", "cannot be exported", fmt)
    assert not any((tmp_path / "out").iterdir())
