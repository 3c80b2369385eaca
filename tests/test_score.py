"""``aeflow-cli score`` and :class:`monai_aeflow.inference.AnomalyScorer`: maps on the input's grid, outputs,
bad input, and batching.

The model is the session fixture ``small_volume_model`` (conftest.py): a ResNet-18 AE-FLOW trained for a
few epochs on healthy synthetic volumes through the same preprocessing that scoring rebuilds from the file.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score

from aeflow_cli.main import cli
from monai_aeflow.checkpoint import read_checkpoint, save_model
from monai_aeflow.data.io import load_image
from monai_aeflow.inference import AnomalyScorer, expand_inputs, score_slices
from monai_aeflow.networks import AEFlow


def _run(*args: str):
    return CliRunner().invoke(cli, ["score", *args, "--device", "cpu", "--quiet"])


def _one_line_error(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _reframe(src: str, dst: Path, pad=((7, 9), (3, 10), (0, 0)), flip: bool = True, scale: float = 1.0) -> Path:
    """Re-save a volume on another grid: padded in-plane (so crop/pad must be undone) and stored LPS."""
    img = nib.load(src)
    data = np.pad(np.asarray(img.dataobj, dtype=np.float32), pad) * scale
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([p[0] for p in pad], dtype=float)
    if flip:  # store x and y reversed (LPS): the same anatomy in world space
        flip_m = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip_m[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
        data = data[::-1, ::-1]
        affine = affine @ flip_m
    dtype = np.int16 if scale != 1.0 else np.float32
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(dtype), affine), str(dst))
    return dst


@pytest.fixture(scope="module")
def lesion_case(small_volume_model, tmp_path_factory) -> dict:
    """A lesioned subject stored on a padded LPS grid, with its label on the same grid."""
    tmp = tmp_path_factory.mktemp("lesion_case")
    rec = small_volume_model["lesioned"][0]
    image = _reframe(rec["image"], tmp / "case_flair.nii.gz", scale=1000.0)
    label = _reframe(rec["label"], tmp / "case_label.nii.gz")
    brain = _reframe(rec["brain_mask"], tmp / "case_brain.nii.gz")
    return {"image": image, "label": label, "brain": brain, "model": small_volume_model["model"]}


def test_score_volume_overlays_input_and_finds_the_lesion(lesion_case, tmp_path):
    result = _run(str(lesion_case["image"]), "--model", str(lesion_case["model"]), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    src = nib.load(lesion_case["image"])
    amap_img = nib.load(tmp_path / "case_flair_anomaly.nii.gz")
    mask_img = nib.load(tmp_path / "case_flair_mask.nii.gz")
    for out in (amap_img, mask_img):
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    assert amap_img.get_data_dtype() == np.float32 and mask_img.get_data_dtype() == np.uint8
    amap = amap_img.get_fdata()
    truth = nib.load(lesion_case["label"]).get_fdata() > 0
    brain = nib.load(lesion_case["brain"]).get_fdata() > 0
    assert truth.sum() > 100
    # the map is higher inside the lesion than in the healthy brain (independent check with scikit-learn)
    assert amap[truth].mean() > 1.5 * amap[brain & ~truth].mean()
    assert roc_auc_score(truth[brain], amap[brain]) > 0.8
    mask = mask_img.get_fdata() > 0
    assert (mask & truth).sum() > 0.2 * truth.sum()  # the lesion mask covers the lesion...
    assert (mask & truth).sum() > 0.3 * mask.sum()  # ...and is mostly lesion
    scores = json.loads((tmp_path / "case_flair_scores.json").read_text())
    assert len(scores["slice_scores"]) == src.shape[2]
    assert scores["threshold"] == pytest.approx(AnomalyScorer(lesion_case["model"], device="cpu").threshold)
    assert scores["threshold_source"] == "model"
    assert scores["volume_score"] == pytest.approx(amap[amap != 0].sum() / (amap != 0).sum(), rel=0.2)
    assert scores["lesion_voxels"] == int(mask.sum())
    assert scores["model"]["model_sha256"] and scores["model"]["preprocessing"]["spatial_size"] == [64, 64]
    lesion_slices = np.flatnonzero(truth.reshape(-1, truth.shape[2]).sum(0) > 30)
    healthy_slices = [i for i, s in enumerate(scores["slice_scores"]) if s is not None and not truth[..., i].any()]
    lesion_scores = [scores["slice_scores"][i] for i in lesion_slices]
    assert np.mean(lesion_scores) > np.mean([scores["slice_scores"][i] for i in healthy_slices])
    preview = Image.open(tmp_path / "case_flair_preview.png")
    assert preview.size[0] > 100 and preview.size[1] > 100


def _write_dicom_series(nifti: Path, folder: Path) -> Path:
    import itk

    image = itk.imread(str(nifti), itk.SS)
    folder.mkdir()
    names = [str(folder / f"{i:04d}.dcm") for i in range(nib.load(nifti).shape[2])]
    writer = itk.ImageSeriesWriter[itk.Image[itk.SS, 3], itk.Image[itk.SS, 2]].New()
    writer.SetInput(image)
    writer.SetImageIO(itk.GDCMImageIO.New())
    writer.SetFileNames(names)
    writer.Update()
    return folder


def test_dicom_series_scores_like_the_nifti(lesion_case, tmp_path):
    dicom = _write_dicom_series(lesion_case["image"], tmp_path / "case_dicom")
    scorer = AnomalyScorer(lesion_case["model"], device="cpu")
    from_dicom = scorer.score(dicom)
    from_nifti = scorer.score(lesion_case["image"])
    loaded = load_image(dicom, orientation=None)
    assert from_dicom.anomaly_map.shape == tuple(loaded.shape[1:])
    np.testing.assert_allclose(from_dicom.affine, loaded.affine.numpy(), atol=1e-4)
    # the series holds the same voxels in the same order: the maps agree voxel for voxel
    np.testing.assert_allclose(from_dicom.anomaly_map, from_nifti.anomaly_map, atol=1e-4)
    result = _run(str(dicom), "--model", str(lesion_case["model"]), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    written = nib.load(tmp_path / "out" / "case_dicom_anomaly.nii.gz")
    np.testing.assert_allclose(written.affine, loaded.affine.numpy(), atol=1e-4)


def test_png_scores_on_its_own_pixel_grid(small_volume_model, tmp_path):
    rec = small_volume_model["lesioned"][1]
    vol = nib.load(rec["image"]).get_fdata()
    truth = nib.load(rec["label"]).get_fdata() > 0
    z = int(np.argmax(truth.reshape(-1, truth.shape[2]).sum(0)))
    sl = vol[..., z]
    sl = np.clip(sl / np.percentile(sl[sl > 0], 99), 0, 1)
    # a non-square PNG (rows = y, columns = x as PIL stores it), so a transposition would be caught
    pixels = np.pad((sl * 255).astype(np.uint8).T, ((0, 16), (0, 0)))
    Image.fromarray(pixels).save(tmp_path / "slice.png")
    lesion_pixels = np.pad(truth[..., z].T, ((0, 16), (0, 0)))
    result = _run(str(tmp_path / "slice.png"), "--model", str(small_volume_model["model"]), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    amap = np.asarray(Image.open(tmp_path / "slice_anomaly.tif"))
    mask = np.asarray(Image.open(tmp_path / "slice_mask.png"))
    assert amap.shape == pixels.shape and mask.shape == pixels.shape and amap.dtype == np.float32
    brain = pixels > 0
    assert amap[lesion_pixels].mean() > 1.5 * amap[brain & ~lesion_pixels].mean()
    scores = json.loads((tmp_path / "slice_scores.json").read_text())
    assert scores["kind"] == "image2d" and len(scores["slice_scores"]) == 1


def test_batched_scoring_equals_a_per_slice_loop(small_volume_model):
    net = AnomalyScorer(small_volume_model["model"], device="cpu").network
    images = torch.rand(9, 1, 64, 48)
    batched = score_slices(net, images, batch_size=4)
    single = [score_slices(net, images[i : i + 1], batch_size=1) for i in range(9)]
    for key in ("anomaly_map", "reconstruction", "score", "score_flow", "score_recon"):
        np.testing.assert_allclose(
            batched[key].numpy(), torch.cat([s[key] for s in single]).numpy(), atol=1e-4, err_msg=key
        )


def test_outputs_are_not_overwritten_without_the_flag(lesion_case, tmp_path):
    args = (str(lesion_case["image"]), "--model", str(lesion_case["model"]), "--out", str(tmp_path))
    assert _run(*args).exit_code == 0
    target = tmp_path / "case_flair_anomaly.nii.gz"
    target.write_bytes(b"keep me")
    line = _one_line_error(_run(*args))
    assert "case_flair_anomaly.nii.gz" in line and "--overwrite" in line
    assert target.read_bytes() == b"keep me"
    assert _run(*args, "--overwrite").exit_code == 0
    assert nib.load(target).shape == nib.load(lesion_case["image"]).shape


def test_interrupted_write_leaves_no_partial_file(lesion_case, tmp_path, monkeypatch):
    import monai_aeflow.fileio as fileio
    import monai_aeflow.inference.outputs as pipeline

    scorer = AnomalyScorer(lesion_case["model"], device="cpu")
    result = scorer.score(lesion_case["image"])
    real_atomic_write = fileio.atomic_write

    def interrupted(path, write):  # the map's bytes are half on disk when the interrupt comes
        def partial(tmp):
            Path(tmp).write_bytes(b"\x1f\x8b partial")
            raise KeyboardInterrupt

        return real_atomic_write(path, partial)

    monkeypatch.setattr(fileio, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.write_outputs(result, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_many_inputs_one_bad_others_complete(lesion_case, small_volume_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [inputs / "a.nii.gz", inputs / "b.nii.gz"]
    good[0].write_bytes(Path(lesion_case["image"]).read_bytes())
    good[1].write_bytes(Path(small_volume_model["healthy"][0]["image"]).read_bytes())
    (inputs / "broken.nii.gz").write_bytes(Path(lesion_case["image"]).read_bytes()[:5000])
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["score", str(inputs), "--model", str(lesion_case["model"]), "--out", str(tmp_path / "o"), "--device", "cpu"],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "broken.nii.gz" in result.output and "1 of 3 inputs failed" in result.output
    for name, src in zip(("a", "b"), good, strict=True):
        assert nib.load(tmp_path / "o" / f"{name}_anomaly.nii.gz").shape == nib.load(src).shape
    assert not list((tmp_path / "o").glob("broken*"))
    summary = (tmp_path / "o" / "summary.csv").read_text().splitlines()
    assert len(summary) == 4 and sum(",ok," in row for row in summary) == 2
    for name in ("a", "b"):
        scores = json.loads((tmp_path / "o" / f"{name}_scores.json").read_text())
        assert scores["input"].endswith(f"{name}.nii.gz") and np.isfinite(scores["volume_score"])


def test_expand_inputs_globs_folders_and_dicom(tmp_path, lesion_case):
    (tmp_path / "x.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    _write_dicom_series(lesion_case["image"], tmp_path / "series")
    found = expand_inputs([tmp_path])
    assert [p.name for p in found] == ["series", "x.nii.gz"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.nii.gz")])] == ["x.nii.gz"]
    assert expand_inputs([tmp_path / "series"]) == [tmp_path / "series"]


# -- bad input: one line naming the file, exit code 2, no traceback ---------------------------------------


def test_missing_path(lesion_case, tmp_path):
    line = _one_line_error(
        _run(str(tmp_path / "nope.nii.gz"), "--model", str(lesion_case["model"]), "-o", str(tmp_path))
    )
    assert "nope.nii.gz" in line and "not found" in line


def test_truncated_nifti(lesion_case, tmp_path):
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(Path(lesion_case["image"]).read_bytes()[:3000])
    line = _one_line_error(_run(str(bad), "--model", str(lesion_case["model"]), "-o", str(tmp_path)))
    assert "cut.nii.gz" in line


def test_corrupt_nifti(lesion_case, tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(gzip.compress(os.urandom(2000)))
    line = _one_line_error(_run(str(bad), "--model", str(lesion_case["model"]), "-o", str(tmp_path)))
    assert "garbage.nii.gz" in line


def test_4d_volume(lesion_case, tmp_path):
    bad = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 10, 4).astype(np.float32), np.eye(4)), str(bad))
    line = _one_line_error(_run(str(bad), "--model", str(lesion_case["model"]), "-o", str(tmp_path)))
    assert "dwi.nii.gz" in line and "4D" in line


def test_two_voxel_thick_volume(lesion_case, tmp_path):
    bad = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(64, 64, 2).astype(np.float32) + 0.1, np.eye(4)), str(bad))
    line = _one_line_error(_run(str(bad), "--model", str(lesion_case["model"]), "-o", str(tmp_path)))
    assert "thin.nii.gz" in line and "2 voxels thick" in line


def test_wrong_modality_count(lesion_case, tmp_path):
    three_channel = tmp_path / "three_channel.pt"
    save_model(
        AEFlow(in_channels=3, backbone="resnet18", backbone_weights=None),
        three_channel,
        {"preprocessing": {"spatial_size": [64, 64], "modalities": ["flair", "t1", "t2"]}},
    )
    line = _one_line_error(_run(str(lesion_case["image"]), "--model", str(three_channel), "-o", str(tmp_path)))
    assert "case_flair.nii.gz" in line and "1 channel(s)" in line and "trained on 3" in line


def test_checkpoint_of_another_model(lesion_case, tmp_path):
    other = tmp_path / "unet.pt"
    torch.save({"network": {"conv.weight": torch.zeros(3, 3)}, "config": {"model": {"in_channels": 1}}}, other)
    line = _one_line_error(_run(str(lesion_case["image"]), "--model", str(other), "-o", str(tmp_path)))
    assert "unet.pt" in line and "do not match" in line
    plain = tmp_path / "state_dict.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, plain)
    line = _one_line_error(_run(str(lesion_case["image"]), "--model", str(plain), "-o", str(tmp_path)))
    assert "state_dict.pt" in line and "not a monai-aeflow checkpoint" in line


class _Exploit:
    """Unpickling this object would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_checkpoint_that_executes_code_is_refused(lesion_case, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"network": _Exploit(marker), "config": {"model": {}}}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    line = _one_line_error(_run(str(lesion_case["image"]), "--model", str(evil), "-o", str(tmp_path)))
    assert "evil.pt" in line and "refused" in line
    assert not marker.exists()


def test_missing_model_and_empty_bundle(lesion_case, tmp_path):
    line = _one_line_error(_run(str(lesion_case["image"]), "--model", str(tmp_path / "none.pt"), "-o", str(tmp_path)))
    assert "none.pt" in line and "not found" in line
    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    line = _one_line_error(_run(str(lesion_case["image"]), "--model", str(tmp_path / "bundle"), "-o", str(tmp_path)))
    assert "bundle" in line and "models/model.pt" in line


def test_bundle_folder_is_accepted(lesion_case, tmp_path):
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    (tmp_path / "bundle" / "models" / "model.pt").write_bytes(Path(lesion_case["model"]).read_bytes())
    assert (
        _run(str(lesion_case["image"]), "--model", str(tmp_path / "bundle"), "-o", str(tmp_path / "o")).exit_code == 0
    )


# -- real scans beside the repository (skipped when absent) ------------------------------------------------


@pytest.mark.realdata
def test_brats_case_and_dicom_series_align_with_their_grids(shared_data, small_volume_model, tmp_path):
    brats = sorted((shared_data / "brats2015_dev").glob("*/*Flair*.nii*"))
    if not brats:
        brats = sorted((shared_data / "brats2015_dev").rglob("*Flair*.nii*"))
    assert brats, "no FLAIR volume in brats2015_dev"
    dicom = shared_data / "dicom_t1_series"
    # the same weights with 3.75 mm resampling, so that 64 x 64 covers a 240 mm field of view: the map must
    # come back through resampling, crop/pad and reorientation
    ckpt = read_checkpoint(small_volume_model["model"])
    ckpt["config"]["preprocessing"] = {**ckpt["config"]["preprocessing"], "spacing": [3.75, 3.75, 3.75]}
    model = tmp_path / "resampling_model.pt"
    torch.save(ckpt, model)
    scorer = AnomalyScorer(model, device="cpu")
    for source in (brats[0], dicom):
        result = scorer.score(source)
        loaded = load_image(source, orientation=None)
        assert result.anomaly_map.shape == tuple(loaded.shape[1:])
        np.testing.assert_allclose(result.affine, loaded.affine.numpy(), atol=1e-3)
        assert np.isfinite(result.anomaly_map).all()
        # the map is zero outside the brain and covers the brain (not only a cropped centre)
        assert (result.anomaly_map[result.brain_mask == 0] == 0).all()
        assert (result.anomaly_map[result.brain_mask > 0] > 0).mean() > 0.9
    out = _run(str(brats[0]), "--model", str(model), "-o", str(tmp_path))
    assert out.exit_code == 0, out.output
    written = nib.load(next(tmp_path.glob("*_anomaly.nii.gz")))
    src = nib.load(brats[0])
    assert written.shape == src.shape
    np.testing.assert_allclose(written.affine, src.affine, atol=1e-4)


def test_score_output_folder_is_evaluated_as_it_is(lesion_case, tmp_path):
    from monai_aeflow.evaluation.io import find_cases

    out = _run(str(lesion_case["image"]), "--model", str(lesion_case["model"]), "-o", str(tmp_path / "maps"))
    assert out.exit_code == 0, out.output
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "case_flair.nii.gz").write_bytes(Path(lesion_case["label"]).read_bytes())
    cases = find_cases(tmp_path / "maps", tmp_path / "labels")
    assert [c["name"] for c in cases] == ["case_flair"]
    assert cases[0]["map"].name == "case_flair_anomaly.nii.gz"


def test_default_batch_size():
    from monai_aeflow.inference import default_batch_size

    assert default_batch_size("cuda", 240, 240) == 32
    assert default_batch_size("cpu", 64, 64) == 64
    assert default_batch_size("cpu", 128, 128) == 16
    assert default_batch_size("cpu", 240, 240) == 4
    assert default_batch_size("cpu", 1024, 1024) == 1


def test_map_sums_match_numpy_masked_mean():
    """The volume summary (mean map over the brain, brain and lesion voxels) from one reduction, numpy or torch,
    equals numpy's masked mean and counts."""
    from monai_aeflow.inference.result import map_sums

    rng = np.random.default_rng(3)
    amap = rng.random((30, 28, 9), dtype=np.float32) * 5
    brain = rng.random((30, 28, 9)) > 0.4
    lesion = (amap > 4.5) & brain
    expected = [amap[brain].astype(np.float64).sum(), brain.sum(), lesion.sum()]
    got_np = map_sums(amap, brain, lesion)
    got_t = map_sums(torch.from_numpy(amap), torch.from_numpy(brain), torch.from_numpy(lesion)).numpy()
    for got in (got_np, got_t):
        assert got[0] / got[1] == pytest.approx(float(amap[brain].mean()), rel=1e-6)
        assert got[0] == pytest.approx(expected[0], rel=1e-9)
        assert (int(got[1]), int(got[2])) == (int(expected[1]), int(expected[2]))
    assert np.isnan(map_sums(amap, brain, None)[2]) and np.isnan(
        float(map_sums(torch.from_numpy(amap), torch.from_numpy(brain), None)[2])
    )
