"""MONAI Label app: the infer task called directly, and a real ``monailabel`` server answering HTTP requests.

Skipped when MONAI Label is not installed (the ``label`` extra, see the README). The model is the small AE-FLOW of
``tests/conftest.py`` (trained once per session on synthetic volumes, with a stored threshold).
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

from label_server import LocalLabelServer, parse_infer_response  # noqa: E402

from monai_aeflow.errors import AEFlowInputError, CheckpointError  # noqa: E402
from monai_aeflow.evaluation.postprocess import postprocess_map  # noqa: E402
from monai_aeflow.inference import AnomalyScorer  # noqa: E402
from monai_aeflow.label import ANOMALY_MAP_TAG, AEFlowInferTask, LabelAppConfig  # noqa: E402
from monai_aeflow.label.levels import FALLBACK, LEVEL_NAMES, AEFlowLevelsTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "aeflow_label"
START_DEADLINE_S = 240.0
REQUEST_TIMEOUT_S = 300.0


def _check_label(label_file: str | Path, record: dict) -> np.ndarray:
    """The label has the input's shape and affine and covers the lesion; returns the mask."""
    image = nib.load(record["image"])
    label = nib.load(str(label_file))
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-5)
    assert label.get_data_dtype() == np.uint8
    mask = np.asanyarray(label.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    mask = mask > 0
    truth = nib.load(record["label"]).get_fdata() > 0
    hit = int((mask & truth).sum())
    # the mask lies mostly on the lesion and covers a good part of it (lesions are ~1% of the brain)
    assert hit >= 0.25 * truth.sum(), (hit, int(truth.sum()), int(mask.sum()))
    assert hit >= 0.5 * mask.sum(), (hit, int(truth.sum()), int(mask.sum()))
    return mask


def _check_scores(result: dict, record: dict, threshold: float) -> None:
    shape = nib.load(record["image"]).shape
    assert isinstance(result["volume_score"], float) and result["volume_score"] > 0
    assert len(result["slice_scores"]) == shape[2]
    assert any(s is not None for s in result["slice_scores"])
    assert result["threshold"] == pytest.approx(threshold)
    assert result["label_name"] == "anomaly"
    assert result["lesion_voxels"] > 0


def _check_map(map_file: str | Path, record: dict) -> None:
    image = nib.load(record["image"])
    amap = nib.load(str(map_file))
    assert amap.shape == image.shape
    np.testing.assert_allclose(amap.affine, image.affine, atol=1e-5)
    assert amap.get_data_dtype() == np.float32
    data = amap.get_fdata()
    truth = nib.load(record["label"]).get_fdata() > 0
    assert data[truth].mean() > 1.5 * data[(data > 0) & ~truth].mean()


def _reference_processed(model: str | Path, record: dict) -> tuple[np.ndarray, np.ndarray]:
    """The post-processed map the levels are cut from: the scorer's map through the stored post-processing."""
    scorer = AnomalyScorer(model, device="cpu")
    result = scorer.score(record["image"])
    brain = result.brain_mask > 0
    return postprocess_map(result.anomaly_map, brain, scorer.postprocess_config), brain


def _check_levels(levels: np.ndarray, processed: np.ndarray, brain: np.ndarray, reported: dict) -> None:
    """Levels 0-3 inside the brain, nested (every higher level scores above every lower one), cut at the bounds."""
    assert levels.dtype == np.uint8 and set(np.unique(levels)) <= {0, 1, 2, 3}
    assert not levels[~brain].any()
    bounds = [reported["labels"][name]["above"] for name in LEVEL_NAMES]
    assert [reported["labels"][name]["value"] for name in LEVEL_NAMES] == [1, 2, 3]
    assert 0 < bounds[0] < bounds[1] < bounds[2]
    masks = [levels == k for k in (1, 2, 3)]
    assert masks[0].any() and masks[2].any(), [int(m.sum()) for m in masks]
    for lo in range(3):
        for hi in range(lo + 1, 3):
            if masks[lo].any() and masks[hi].any():
                assert processed[masks[hi]].min() > processed[masks[lo]].max(), (lo, hi)
    # level = how many bounds the score is strictly above (numpy's digitize as the reference)
    np.testing.assert_array_equal(levels, np.digitize(processed, bounds, right=True) * brain)
    assert reported["voxels"] == {name: int(m.sum()) for name, m in zip(LEVEL_NAMES, masks, strict=True)}


# -- the infer task, in-process -----------------------------------------------------------------------------------
def test_infer_task_returns_mask_scores_and_map(small_volume_model):
    task = AEFlowInferTask(small_volume_model["model"], device="cpu", batch_size=16)
    assert task.is_valid() and task.info()["labels"] == {"anomaly": 1}
    record = small_volume_model["lesioned"][0]
    label_file, result = task({"image": str(record["image"])})
    try:
        _check_label(label_file, record)
        _check_scores(result, record, small_volume_model["threshold"])
        _check_map(result["anomaly_map_file"], record)
        json.dumps(result)  # the server sends it as JSON
    finally:
        for f in (label_file, result.get("anomaly_map_file")):
            if f and os.path.exists(f):
                os.remove(f)


def test_infer_task_without_threshold_returns_empty_label(small_volume_model, tmp_path):
    from monai_aeflow.checkpoint import load_model, read_checkpoint, save_model

    net, ckpt = load_model(small_volume_model["model"])
    bare = save_model(net, tmp_path / "bare.pt", config={k: v for k, v in ckpt["config"].items() if k != "model"})
    assert read_checkpoint(bare)["threshold"] is None
    task = AEFlowInferTask(bare, device="cpu")
    record = small_volume_model["lesioned"][0]
    label_file, result = task({"image": str(record["image"])})
    try:
        assert not np.asanyarray(nib.load(label_file).dataobj).any()
        assert result["threshold"] is None and "threshold" in result["message"]
    finally:
        os.remove(label_file)
        os.remove(result["anomaly_map_file"])


def test_levels_task_fallback_bounds_and_nested_levels(small_volume_model):
    task = AEFlowLevelsTask(small_volume_model["model"], device="cpu")
    threshold = small_volume_model["threshold"]
    info = task.info()
    assert info["type"] == "segmentation" and info["labels"] == {name: i + 1 for i, name in enumerate(LEVEL_NAMES)}
    assert set(info["label_colors"]) == set(LEVEL_NAMES)
    assert info["levels"]["source"] == FALLBACK
    bounds = [info["levels"]["labels"][n]["above"] for n in LEVEL_NAMES]
    assert bounds == pytest.approx([threshold / 2, 0.75 * threshold, threshold])
    record = small_volume_model["lesioned"][0]
    label_file, result = task({"image": str(record["image"])})
    try:
        image, label = nib.load(record["image"]), nib.load(label_file)
        assert label.shape == image.shape
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-5)
        processed, brain = _reference_processed(small_volume_model["model"], record)
        _check_levels(np.asanyarray(label.dataobj), processed, brain, result["levels"])
    finally:
        for f in (label_file, result.get("anomaly_map_file")):
            if f and os.path.exists(f):
                os.remove(f)


def test_levels_task_uses_healthy_percentiles_stored_in_the_model(small_volume_model, tmp_path):
    from monai_aeflow.checkpoint import read_checkpoint
    from monai_aeflow.evaluation.checkpoint import save_threshold

    model = Path(shutil.copy(small_volume_model["model"], tmp_path / "model.pt"))
    processed, brain = _reference_processed(model, small_volume_model["healthy"][0])
    p95, p99 = (float(np.percentile(processed[brain], q)) for q in (95, 99))
    protocol = dict(read_checkpoint(model)["threshold_protocol"])
    protocol["healthy_percentiles"] = {"95": p95, "99": p99}
    save_threshold(model, small_volume_model["threshold"], protocol)
    task = AEFlowLevelsTask(model, device="cpu")
    levels = task.info()["levels"]
    assert "healthy" in levels["source"]
    assert [levels["labels"][n]["above"] for n in LEVEL_NAMES] == pytest.approx(
        [p95, p99, small_volume_model["threshold"]]
    )
    record = small_volume_model["lesioned"][0]
    label_file, result = task({"image": str(record["image"])})
    try:
        processed, brain = _reference_processed(model, record)
        _check_levels(np.asanyarray(nib.load(label_file).dataobj), processed, brain, result["levels"])
    finally:
        os.remove(label_file)
        os.remove(result["anomaly_map_file"])


def test_bad_model_and_options_fail_with_one_line_messages(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="missing.pt"):
        AEFlowInferTask(missing, device="cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        AEFlowInferTask(foreign, device="cpu")
    with pytest.raises(CheckpointError, match="--conf model"):
        LabelAppConfig.from_conf({})
    with pytest.raises(AEFlowInputError, match="invalid"):
        LabelAppConfig.from_conf({"model": "m.pt", "batch_size": "many"})
    cfg = LabelAppConfig.from_conf({"model": "m.pt", "threshold": "0.5", "save_anomaly_map": "false"})
    assert cfg.threshold == 0.5 and not cfg.save_anomaly_map and cfg.name == "aeflow"
    assert cfg.levels and cfg.dicom_store
    cfg = LabelAppConfig.from_conf({"model": "m.pt", "levels": "false", "dicom_store": "no"})
    assert not cfg.levels and not cfg.dicom_store
    with pytest.raises(AEFlowInputError, match="levels"):
        LabelAppConfig.from_conf({"model": "m.pt", "levels": "maybe"})


# -- a real server ----------------------------------------------------------------------------------------------
def _copy_app(dest: Path) -> Path:
    """A copy of the app folder, so that the folders ``monailabel`` creates in it stay out of the repository."""
    ignore = shutil.ignore_patterns("bin", "lib", "logs", "model", "__pycache__")
    return Path(shutil.copytree(APP_DIR, dest, ignore=ignore))


def _server(root: Path, studies: Path, model: str | Path) -> LocalLabelServer:
    conf = {"model": model, "device": "cpu"}
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    return LocalLabelServer(_copy_app(root / "app"), studies, conf, log_file=root / "server.log", env=env)


@pytest.fixture(scope="module")
def server(small_volume_model, tmp_path_factory):
    """A ``monailabel`` server with the AE-FLOW app over two synthetic volumes (one lesioned, one healthy)."""
    root = tmp_path_factory.mktemp("label_server")
    studies = root / "studies"
    studies.mkdir()
    cases = {"lesioned": small_volume_model["lesioned"][0], "healthy": small_volume_model["healthy"][0]}
    for name, record in cases.items():
        shutil.copy(record["image"], studies / f"{name}.nii.gz")
    srv = _server(root, studies, small_volume_model["model"])
    assert srv.host == "127.0.0.1"
    try:
        srv.start()
        info = srv.wait_ready(timeout=START_DEADLINE_S)
        yield {"server": srv, "url": srv.url, "info": info, "cases": cases}
    finally:
        srv.stop()
    assert srv.process.poll() is not None


def _infer(srv: LocalLabelServer, image_id: str) -> tuple[bytes, dict]:
    label, result = srv.infer("aeflow", image_id, timeout=REQUEST_TIMEOUT_S)
    assert label is not None, result
    return label, result


def _load_label(content: bytes, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.nii.gz"
    path.write_bytes(content)
    return path


def test_server_info_lists_the_model(server):
    info = server["info"]
    assert "aeflow" in info["models"], info
    model = info["models"]["aeflow"]
    assert model["type"] == "segmentation" and model["labels"] == {"anomaly": 1}
    assert model["threshold"] is not None
    assert info["datastore"]["total"] == 2


def test_server_info_lists_the_heat_map_task(server):
    info = server["info"]
    assert set(info["models"]) == {"aeflow", "aeflow_levels"}, info["models"]
    model = info["models"]["aeflow_levels"]
    assert model["type"] == "segmentation"
    assert model["labels"] == {"anomaly low": 1, "anomaly medium": 2, "anomaly high": 3}
    assert set(model["label_colors"]) == set(LEVEL_NAMES) and all(len(c) == 3 for c in model["label_colors"].values())
    bounds = [model["levels"]["labels"][n]["above"] for n in LEVEL_NAMES]
    assert bounds == sorted(bounds) and bounds[-1] == pytest.approx(info["models"]["aeflow"]["threshold"])
    assert {"anomaly", *LEVEL_NAMES} <= set(info["labels"])


def test_server_levels_task_returns_nested_levels_on_the_input_grid(server, small_volume_model, tmp_path):
    record = server["cases"]["lesioned"]
    label, result = server["server"].infer("aeflow_levels", "lesioned", timeout=REQUEST_TIMEOUT_S)
    assert label is not None, result
    levels = nib.load(_load_label(label, tmp_path, "levels"))
    image = nib.load(record["image"])
    assert levels.shape == image.shape
    np.testing.assert_allclose(levels.affine, image.affine, atol=1e-5)
    processed, brain = _reference_processed(small_volume_model["model"], record)
    _check_levels(np.asanyarray(levels.dataobj), processed, brain, result["levels"])
    assert result["anomaly_map"] is None  # the lesion-mask task stores the map


def test_server_infer_returns_label_scores_and_anomaly_map(server, small_volume_model, tmp_path):
    srv, url, record = server["server"], server["url"], server["cases"]["lesioned"]
    content, result = _infer(srv, "lesioned")
    _check_label(_load_label(content, tmp_path, "label"), record)
    _check_scores(result, record, small_volume_model["threshold"])
    ref = result["anomaly_map"]
    assert ref["tag"] == ANOMALY_MAP_TAG and ref["label_id"] == "lesioned"
    res = requests.get(f"{url}{ref['url']}", timeout=60)
    assert res.status_code == 200
    map_file = tmp_path / "map.nii.gz"
    map_file.write_bytes(res.content)
    _check_map(map_file, record)

    # the second study of the datastore gets its own label and scores
    content_h, result_h = _infer(srv, "healthy")
    healthy = nib.load(_load_label(content_h, tmp_path, "healthy"))
    assert healthy.shape == nib.load(server["cases"]["healthy"]["image"]).shape
    assert result_h["input"] != result["input"] and len(result_h["slice_scores"]) == healthy.shape[2]
    assert result_h["anomaly_map"]["label_id"] == "healthy"


def test_server_eight_concurrent_requests_match_one(server, tmp_path):
    srv = server["server"]
    one_content, one = _infer(srv, "lesioned")
    reference = np.asanyarray(nib.load(_load_label(one_content, tmp_path, "one")).dataobj)
    with ThreadPoolExecutor(max_workers=8) as pool:
        outputs = list(pool.map(lambda _: _infer(srv, "lesioned"), range(8)))
    assert len(outputs) == 8
    for i, (content, result) in enumerate(outputs):
        label = np.asanyarray(nib.load(_load_label(content, tmp_path, f"c{i}")).dataobj)
        np.testing.assert_array_equal(label, reference)
        assert result["volume_score"] == one["volume_score"]
        assert result["slice_scores"] == one["slice_scores"]
        assert result["threshold"] == one["threshold"]


def test_server_infers_an_uploaded_volume(server, tmp_path):
    record = server["cases"]["lesioned"]
    with open(record["image"], "rb") as fh:
        files = {"file": ("upload.nii.gz", fh, "application/octet-stream")}
        res = requests.post(f"{server['url']}/infer/aeflow", files=files, timeout=REQUEST_TIMEOUT_S)
    assert res.status_code == 200, res.text[:2000]
    content, result = parse_infer_response(res)
    _check_label(_load_label(content, tmp_path, "upload"), record)
    assert result["anomaly_map"] is None  # not a datastore image: nowhere to keep the map


def test_server_unknown_image_is_an_error_not_a_crash(server):
    res = requests.post(f"{server['url']}/infer/aeflow", params={"image": "no_such_case"}, timeout=60)
    assert res.status_code >= 400
    assert requests.get(f"{server['url']}/info/", timeout=10).status_code == 200


def test_server_refuses_to_start_without_a_usable_model(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    missing = tmp_path / "no_model.pt"
    srv = _server(tmp_path, studies, missing)
    try:
        code = srv.start().wait_exit(START_DEADLINE_S)
    finally:
        srv.stop()
    text = srv.log_tail(20000)
    assert code is not None and code != 0, text[-3000:]
    assert f"AE-FLOW app cannot start: {missing}: model file not found" in text, text[-3000:]
