"""``aeflow-cli score`` at scale: decoding in worker processes and writing in a background thread give the same
outputs as one process; a write error is recorded as before; post-processing in torch equals scipy; and
``torchrun`` with 2 gloo processes scores every input exactly once, with outputs identical to one process.

The model is a small random AE-FLOW (ResNet-18 layer3, ActNorm initialised on the volumes): these tests compare
two ways of running the same model, so its quality does not matter.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from aeflow_cli.main import cli
from monai_aeflow.checkpoint import save_model
from monai_aeflow.data.synthetic import generate_cohort
from monai_aeflow.inference import AnomalyScorer, score_paths
from monai_aeflow.networks import AEFlow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort_and_model(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("scale")
    cohort = generate_cohort(tmp / "data", 2, 3, seed=3, shape=(48, 48, 20), spacing=(3.0, 3.0, 3.0))
    torch.manual_seed(0)
    net = AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2).eval()
    net.initialize_flow(torch.rand(8, 1, 48, 48))
    pp = {"residual": "absolute", "median_size": 3, "median_dims": 2, "min_component_size": 3}
    model = save_model(
        net,
        tmp / "model.pt",
        config={"preprocessing": {"spatial_size": [48, 48], "percentiles": [1.0, 99.0], "orientation": "RAS"}},
        threshold=0.05,
        threshold_protocol={"method": "fixed for the test", "postprocessing": pp},
    )
    return {"model": model, "images": [Path(r["image"]) for r in cohort]}


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.nii.gz")):
        out[f.name] = np.asarray(nib.load(f).dataobj)
    for f in sorted(folder.glob("*_scores.json")):
        s = json.loads(f.read_text())
        out[f.name] = np.array([s["volume_score"], s["lesion_voxels"]] + [v or 0 for v in s["slice_scores"]])
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_worker_processes_and_background_writer_give_the_same_outputs(cohort_and_model, tmp_path):
    scorer = AnomalyScorer(cohort_and_model["model"], device="cpu")
    inputs = [*cohort_and_model["images"], tmp_path / "missing.nii.gz"]
    rows = {}
    for workers in (0, 2):
        rows[workers] = score_paths(scorer, inputs, tmp_path / f"w{workers}", preview=False, workers=workers,
                                    progress=False)  # fmt: skip
    for w, r in rows.items():
        assert [x["status"] for x in r] == ["ok"] * 5 + ["error"], w
        assert "not found" in r[-1]["error"] and r[-1]["user_error"]
        assert all(x["timing"]["write_seconds"] > 0 for x in r[:-1])
    _same(_outputs(tmp_path / "w0"), _outputs(tmp_path / "w2"))
    assert len(list((tmp_path / "w2").glob("*_anomaly.nii.gz"))) == 5


def test_write_error_is_recorded_and_leaves_nothing_half_written(cohort_and_model, tmp_path, monkeypatch):
    import monai_aeflow.inference.outputs as outputs

    scorer = AnomalyScorer(cohort_and_model["model"], device="cpu")
    calls = {"n": 0}
    real = outputs.atomic_write_json

    def failing(path, data):  # the scores JSON of the second input cannot be written
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(outputs, "atomic_write_json", failing)
    images = cohort_and_model["images"][:3]
    rows = score_paths(scorer, images, tmp_path, preview=False, workers=2, progress=False)
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert "No space left on device" in rows[1]["error"] and not rows[1]["user_error"]
    name = rows[1]["name"]
    assert not list(tmp_path.glob(f"{name}*")) and not list(tmp_path.glob(f".{name}*"))


def test_scorer_post_processing_in_torch_equals_scipy(cohort_and_model):
    image = cohort_and_model["images"][-1]
    ref = AnomalyScorer(cohort_and_model["model"], device="cpu").score(image)
    got = AnomalyScorer(cohort_and_model["model"], device="cpu", postprocess_device="torch-cpu").score(image)
    assert ref.lesion_mask.sum() > 0
    np.testing.assert_array_equal(got.lesion_mask, ref.lesion_mask)
    np.testing.assert_array_equal(got.anomaly_map, ref.anomaly_map)


def test_torchrun_two_gloo_ranks_score_each_input_once_like_one_process(cohort_and_model, tmp_path):
    images = [str(p) for p in cohort_and_model["images"]]
    model = str(cohort_and_model["model"])
    one = CliRunner().invoke(cli, ["score", *images, "-m", model, "-o", str(tmp_path / "one"), "--device", "cpu",
                                   "--quiet", "--no-preview", "--workers", "0"])  # fmt: skip
    assert one.exit_code == 0, one.output
    missing = str(tmp_path / "missing.nii.gz")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "cli")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "aeflow_cli",
           "score", *images, missing, "-m", model, "-o", str(tmp_path / "two"), "--device", "cpu", "--quiet",
           "--no-preview", "--workers", "0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    # the missing input is a user's error: rank 0 exits 2, the other rank 0 (torchrun itself then returns 1)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stdout + proc.stderr
    # no rank's traceback (torchrun may list rank 1 as SIGTERM-ed when rank 0's exit code 2 comes first: a race
    # of torchrun's "stop every worker when one fails", not an error of rank 1)
    assert "monai_aeflow/" not in proc.stderr and "aeflow_cli/" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "not found" in errors[0], proc.stderr  # rank 0 reports, once
    with open(tmp_path / "two" / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert [r["input"] for r in summary] == [*images, missing]
    assert [r["status"] for r in summary] == ["ok"] * 5 + ["error"]
    _same(_outputs(tmp_path / "one"), _outputs(tmp_path / "two"))


def test_several_writer_and_scoring_threads_give_the_same_outputs_in_input_order(cohort_and_model, tmp_path):
    scorer = AnomalyScorer(cohort_and_model["model"], device="cpu")
    inputs = [*cohort_and_model["images"], tmp_path / "missing.nii.gz"]
    runs = {}
    for write, score in ((1, 1), (3, 1), (2, 3)):
        runs[write, score] = score_paths(scorer, inputs, tmp_path / f"w{write}s{score}", preview=True, workers=0,
                                         progress=False, write_threads=write, score_threads=score)  # fmt: skip
    for (write, score), rows in runs.items():
        assert [r["input"] for r in rows] == [str(p) for p in inputs], (write, score)
        assert [r["status"] for r in rows] == ["ok"] * 5 + ["error"], (write, score)
        assert len(list((tmp_path / f"w{write}s{score}").glob("*_preview.png"))) == 5
    _same(_outputs(tmp_path / "w1s1"), _outputs(tmp_path / "w3s1"))
    _same(_outputs(tmp_path / "w1s1"), _outputs(tmp_path / "w2s3"))
    volume_scores = [[r.get("volume_score") for r in rows] for rows in runs.values()]
    assert volume_scores[0] == volume_scores[1] == volume_scores[2]


def test_device_resident_volume_scoring_equals_the_numpy_path_and_preview_slices(cohort_and_model):
    """``score_volume_on`` (tensors kept where asked) against ``score_volume`` (numpy), and the scorer's preview:
    the four most anomalous slices of the model-grid reconstruction and map equal ``score_volume``'s."""
    from monai_aeflow.checkpoint import load_model
    from monai_aeflow.inference import score_volume, score_volume_on
    from monai_aeflow.visualize import most_anomalous_slices

    scorer = AnomalyScorer(cohort_and_model["model"], device="cpu")
    data = scorer.preprocess(cohort_and_model["images"][-1])
    volume = data["image"].as_subclass(torch.Tensor)
    brain = data["mask"][0].numpy() > 0
    keep = np.flatnonzero(brain.reshape(-1, brain.shape[-1]).sum(0) > 0)[2:]  # two slices left unscored
    net, _ = load_model(cohort_and_model["model"], "cpu")
    ref = score_volume(net, volume, slices=keep, batch_size=3)
    got = score_volume_on(net, volume, slices=keep, batch_size=5, output_device="cpu")
    np.testing.assert_allclose(got["anomaly_map"].numpy(), ref.anomaly_map, atol=1e-5)
    np.testing.assert_allclose(got["reconstruction"].numpy(), ref.reconstruction, atol=1e-5)
    np.testing.assert_allclose(got["score"].numpy(), ref.slice_scores, atol=1e-5, equal_nan=True)
    assert np.isnan(got["score"].numpy()).sum() == brain.shape[-1] - keep.size > 0
    result = scorer.score_preprocessed(data)
    ref = score_volume(net, volume, slices=np.flatnonzero(brain.reshape(-1, brain.shape[-1]).sum(0) > 0))
    show = most_anomalous_slices(ref.slice_scores, 4)
    assert len(show) == 4
    np.testing.assert_allclose(result.preview["reconstruction"][..., show], ref.reconstruction[..., show], atol=1e-5)
    np.testing.assert_allclose(
        result.preview["anomaly_map"][..., show], (ref.anomaly_map * brain)[..., show], atol=1e-5
    )


def test_compiled_network_scores_like_eager(cohort_and_model, monkeypatch, tmp_path):
    """``compile=True`` goes through ``torch.compile`` (traced by TorchDynamo; the eager backend keeps the test free
    of a C++ compiler) and gives the eager scorer's outputs."""
    calls = []
    real = torch.compile

    def traced(model, **kwargs):
        calls.append(kwargs)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", traced)
    image = cohort_and_model["images"][-1]
    ref = AnomalyScorer(cohort_and_model["model"], device="cpu").score(image)
    got = AnomalyScorer(cohort_and_model["model"], device="cpu", compile=True).score(image)
    assert calls == [{"mode": "default"}]
    np.testing.assert_allclose(got.anomaly_map, ref.anomaly_map, atol=1e-5)
    np.testing.assert_array_equal(got.lesion_mask, ref.lesion_mask)
    # the CLI flag reaches the scorer
    args = ["score", str(image), "--model", str(cohort_and_model["model"]), "-o", str(tmp_path / "cli"), "--compile"]
    result = CliRunner().invoke(cli, [*args, "--quiet", "--device", "cpu", "--no-preview"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 2


def test_stored_protocol_without_normalisation_keeps_the_raw_map_and_robust_follows_numpy(cohort_and_model, tmp_path):
    """A threshold stored before the per-scan normalisation existed was chosen on raw maps: the scorer keeps
    them raw. A protocol with ``normalize: robust`` gives the lesion mask of the numpy chain on the written map."""
    import shutil

    from monai_aeflow.evaluation.checkpoint import save_threshold
    from monai_aeflow.evaluation.postprocess import PostprocessConfig, postprocess_map, segment

    assert AnomalyScorer(cohort_and_model["model"], device="cpu").postprocess_config.normalize == "none"
    model = shutil.copy(cohort_and_model["model"], tmp_path / "robust.pt")
    pp = {"residual": "absolute", "normalize": "robust", "median_size": 3, "median_dims": 2, "min_component_size": 3}
    save_threshold(model, 2.5, {"method": "sweep", "postprocessing": pp})
    scorer = AnomalyScorer(model, device="cpu")
    assert scorer.postprocess_config.normalize == "robust" and scorer.threshold == 2.5
    first = scorer.score(cohort_and_model["images"][-1])
    cfg = PostprocessConfig(**pp)
    processed = postprocess_map(first.anomaly_map, first.brain_mask > 0, cfg)
    t = float(np.percentile(processed[first.brain_mask > 0], 97))  # a threshold that leaves a few components
    result = AnomalyScorer(model, device="cpu", threshold=t).score(cohort_and_model["images"][-1])
    expected = segment(processed, t, cfg)
    np.testing.assert_array_equal(result.lesion_mask > 0, expected)
    assert 0 < expected.sum() < (result.brain_mask > 0).sum() / 4


def test_score_cli_score_threads_option_gives_the_same_outputs(cohort_and_model, tmp_path):
    images = [str(p) for p in cohort_and_model["images"][:3]]
    common = ["score", *images, "-m", str(cohort_and_model["model"]), "--device", "cpu", "--quiet", "--no-preview",
              "--workers", "0"]  # fmt: skip
    one = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "one")])
    two = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "two"), "--score-threads", "2"])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    _same(_outputs(tmp_path / "one"), _outputs(tmp_path / "two"))
    assert len(_outputs(tmp_path / "two")) >= 6
    bad = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "bad"), "--score-threads", "0"])
    assert bad.exit_code == 2 and "score-threads" in bad.output


def test_folder_of_2d_images_shares_forward_passes_and_scores_like_one_by_one(cohort_and_model, tmp_path):
    """Consecutive 2D images of one size go through the network together (groups of the scorer's batch); maps
    and scores equal each image scored alone by ``AnomalyScorer.score``; a corrupt image fails by itself and a
    volume between images is scored as usual; rows keep the input order."""
    from PIL import Image

    vol = nib.load(cohort_and_model["images"][2]).get_fdata()
    folder = tmp_path / "images"
    folder.mkdir()
    inputs = []
    for k in range(7):
        sl = vol[..., 4 + 2 * k]
        pixels = (np.clip(sl / max(np.percentile(sl, 99), 1e-6), 0, 1) * 255).astype(np.uint8).T
        if k == 5:
            pixels = np.pad(pixels, ((0, 8), (0, 0)))  # another size: not stacked with the others
        path = folder / f"img{k}.png"
        Image.fromarray(pixels).save(path)
        inputs.append(path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    inputs = [*inputs[:3], folder / "broken.png", *inputs[3:5], cohort_and_model["images"][0], *inputs[5:]]

    scorer = AnomalyScorer(cohort_and_model["model"], device="cpu", batch_size=3)
    stacks = []
    run_network = scorer._image_outputs

    def spy(images):
        stacks.append(images.shape[0])
        return run_network(images)

    scorer._image_outputs = spy
    rows = score_paths(scorer, inputs, tmp_path / "out", preview=False, workers=0, progress=False)
    assert [r["input"] for r in rows] == [str(p) for p in inputs]
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"] + ["ok"] * 5
    assert max(stacks) == 3 and len(stacks) < 8  # shared passes (one image each would be 8)

    alone = AnomalyScorer(cohort_and_model["model"], device="cpu", batch_size=3)
    for path, row in zip(inputs, rows, strict=True):
        if row["status"] != "ok" or not str(path).endswith(".png"):
            continue
        ref = alone.score(path)
        amap = np.asarray(Image.open(row["outputs"]["anomaly"]))
        np.testing.assert_allclose(amap, np.asarray(ref.anomaly_map).T, rtol=1e-4, atol=1e-5, err_msg=str(path))
        scores = json.loads(Path(row["outputs"]["scores"]).read_text())
        np.testing.assert_allclose(scores["slice_scores"], ref.scores["slice_scores"], rtol=1e-4, atol=1e-6)
        assert abs(scores["lesion_voxels"] - ref.scores["lesion_voxels"]) <= 2  # a voxel at the threshold may flip
