"""Reliability of ``aeflow-cli score`` (issue 12, section 2): irregular DICOM series, memory bound, output folder
checks, summary.csv, concurrent runs, killed runs and file modes.

The model is the session fixture ``small_volume_model`` (conftest.py). DICOM series are generated here with
pydicom, so that the tests need no data beside the repository.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from aeflow_cli.main import cli
from monai_aeflow.inference.pipeline import output_name


def _run(*args: str):
    return CliRunner().invoke(cli, ["score", *args, "--device", "cpu", "--quiet"])


def _one_line_error(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def _assert_consistent(out: Path, name: str) -> dict:
    """The scores JSON of ``name`` lists every file of the group with its size and hash, and the mask agrees."""
    scores = json.loads((out / f"{name}_scores.json").read_text())
    files = scores["output_files"]
    assert set(files) >= {"anomaly"}
    for entry in files.values():
        path = out / entry["name"]
        data = path.read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], path
    if "mask" in files:
        mask = np.asarray(nib.load(out / files["mask"]["name"]).dataobj)
        assert int(mask.sum()) == scores["lesion_voxels"]
    return scores


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- DICOM series written with pydicom -----------------------------------------------------------------------


def write_dicom_series(folder: Path, n: int = 12, spacing: float = 3.0, positions=None, shape=(40, 48)) -> Path:
    """A small axial MR series (int16, a noisy ellipsoid "brain") with one file per slice."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    rows, cols = shape
    zs = list(positions) if positions is not None else [i * spacing for i in range(n)]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:rows, :cols]
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for i, z in enumerate(zs):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{i:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "MR", "anon", 1, i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [3.0, 3.0], spacing
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        inside = ((yy - rows / 2) / (rows / 2.5)) ** 2 + ((xx - cols / 2) / (cols / 2.5)) ** 2 < 1
        pixels = np.where(inside, 400 + rng.integers(0, 100, (rows, cols)), 0).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        ds.save_as(str(folder / f"{i:03d}.dcm"), write_like_original=False)
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[132:400] = bytes(range(256)) + bytes(12)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncated", "005.dcm"),
        ("corrupt", "005.dcm"),
        ("empty", "005.dcm"),
        ("deleted", "slice spacing not uniform"),
        ("uneven", "slice spacing not uniform"),
    ],
)
def test_irregular_dicom_series_is_refused(small_volume_model, tmp_path, damage, expected):
    positions = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 33, 36] if damage == "uneven" else None
    series = write_dicom_series(tmp_path / "series", positions=positions)
    slice5 = series / "005.dcm"
    if damage == "truncated":
        _truncate(slice5)
    elif damage == "corrupt":
        _corrupt_header(slice5)
    elif damage == "empty":
        slice5.write_bytes(b"")
    elif damage == "deleted":
        slice5.unlink()
    out = tmp_path / "out"
    line = _one_line_error(_run(str(series), "--model", str(small_volume_model["model"]), "-o", str(out)))
    assert str(series) in line and expected in line and "--accept-irregular-series" in line, line
    if damage in ("deleted", "uneven"):
        assert "3 to 6 mm" in line, line
    assert not out.exists() or not list(out.iterdir())


def test_regular_dicom_series_scores(small_volume_model, tmp_path, umask_022):
    series = write_dicom_series(tmp_path / "series")
    out = tmp_path / "out"
    result = _run(str(series), "--model", str(small_volume_model["model"]), "-o", str(out))
    assert result.exit_code == 0, result.output
    scores = _assert_consistent(out, "series")
    assert scores.get("irregular_series") is None
    assert nib.load(out / "series_anomaly.nii.gz").shape == (48, 40, 12)
    assert _hidden(out) == []


def test_accept_irregular_series_scores_as_loaded_and_records_it(small_volume_model, tmp_path):
    series = write_dicom_series(tmp_path / "series")
    _truncate(series / "005.dcm")
    (series / "008.dcm").unlink()
    out = tmp_path / "out"
    result = _run(str(series), "--model", str(small_volume_model["model"]), "-o", str(out), "--accept-irregular-series")
    assert result.exit_code == 0, result.output
    scores = _assert_consistent(out, "series")
    irregular = scores["irregular_series"]
    text = " ".join(irregular["problems"])
    assert "005.dcm" in text and "not uniform" in text
    assert "scored as loaded" in irregular["action"]
    assert irregular["slices_loaded"] == 10 and irregular["slice_files"] == 11
    assert nib.load(out / "series_anomaly.nii.gz").shape[2] == 10


def test_dicom_series_check_finds_no_problem_in_a_real_series(shared_data):
    from monai_aeflow.data.checks import check_dicom_series

    info = check_dicom_series(shared_data / "dicom_t1_series")
    assert info.problems == [] and info.shape[2] > 10


# -- memory bound ----------------------------------------------------------------------------------------------


def _huge_header_nifti(path: Path, shape=(1024, 1024, 1024)) -> Path:
    """A tiny .nii.gz whose header claims ``shape`` (uint8): the header and a little of the body."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), code=1)
    raw = header.binaryblock + b"\0" * 4 + bytes(4096)
    path.write_bytes(gzip.compress(raw))
    return path


def test_huge_header_is_refused_before_allocation(small_volume_model, tmp_path):
    big = _huge_header_nifti(tmp_path / "big.nii.gz")
    assert big.stat().st_size < 10_000
    tracemalloc.start()
    try:
        start = time.perf_counter()
        result = _run(str(big), "--model", str(small_volume_model["model"]), "-o", str(tmp_path / "out"))
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    line = _one_line_error(result)
    assert "big.nii.gz" in line and "1073741824 voxels" in line and "--max-voxels" in line, line
    assert peak < 300 * 2**20, peak  # the volume would take 4 GiB as float32
    assert elapsed < 60


def test_max_voxels_is_checked_before_loading(small_volume_model, tmp_path, monkeypatch):
    import monai_aeflow.data.io as io

    image = small_volume_model["healthy"][0]["image"]

    def no_loading(*args, **kwargs):
        raise AssertionError("the image was loaded")

    monkeypatch.setattr(io, "_loader", no_loading)
    line = _one_line_error(
        _run(str(image), "--model", str(small_volume_model["model"]), "-o", str(tmp_path), "--max-voxels", "1000")
    )
    assert Path(image).name in line and "64 x 64 x 48" in line and "1000" in line, line


def test_header_shape_of_each_format(tmp_path):
    import itk
    from PIL import Image

    from monai_aeflow.data.checks import header_voxels

    arr = np.zeros((7, 9, 11), np.float32)  # itk arrays are (z, y, x)
    itk.imwrite(itk.image_from_array(arr), str(tmp_path / "a.nrrd"))
    itk.imwrite(itk.image_from_array(arr), str(tmp_path / "a.mha"))
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "a.nii.gz"))
    Image.fromarray(np.zeros((13, 17), np.uint8)).save(tmp_path / "a.png")
    series = write_dicom_series(tmp_path / "series", n=5, shape=(20, 24))
    assert header_voxels(tmp_path / "a.nrrd") == ((11, 9, 7), 693)
    assert header_voxels(tmp_path / "a.mha") == ((11, 9, 7), 693)
    assert header_voxels(tmp_path / "a.nii.gz") == ((7, 9, 11), 693)
    assert header_voxels(tmp_path / "a.png") == ((17, 13), 221)
    assert header_voxels(series) == ((24, 20, 5), 2400)


# -- output folder ---------------------------------------------------------------------------------------------


def test_output_folder_under_a_file_is_refused_before_the_model(small_volume_model, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    image = small_volume_model["healthy"][0]["image"]
    # the model does not exist: the output folder must be checked first
    line = _one_line_error(_run(str(image), "--model", str(tmp_path / "missing.pt"), "-o", str(blocker / "out")))
    assert "output folder" in line and str(blocker / "out") in line and "missing.pt" not in line, line
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_the_model(small_volume_model, tmp_path, monkeypatch):
    import monai_aeflow.inference.scorer as pipeline

    out = tmp_path / "ro"
    out.mkdir(mode=0o555)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    try:
        image = small_volume_model["healthy"][0]["image"]
        line = _one_line_error(_run(str(image), "--model", str(small_volume_model["model"]), "-o", str(out)))
        assert "output folder" in line and "not writable" in line and str(out) in line, line
    finally:
        out.chmod(0o755)


# -- summary.csv -------------------------------------------------------------------------------------------------


def test_existing_summary_csv_is_not_replaced_without_overwrite(small_volume_model, tmp_path, umask_022):
    inputs = [small_volume_model["healthy"][0]["image"], small_volume_model["lesioned"][0]["image"]]
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("keep me")
    args = (*map(str, inputs), "--model", str(small_volume_model["model"]), "-o", str(out))
    line = _one_line_error(_run(*args))
    assert "summary.csv" in line and "--overwrite" in line, line
    assert (out / "summary.csv").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # refused before any input was scored
    result = _run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len((out / "summary.csv").read_text().splitlines()) == 3
    for path in out.iterdir():  # every written file follows the umask
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert _hidden(out) == []


# -- concurrent and killed runs ----------------------------------------------------------------------------------

_RUN_AND_PAUSE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    marker, release, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    real_replace = os.replace

    def replace(src, dst, *a, **k):  # pause once the map is in place in the output folder
        real_replace(src, dst, *a, **k)
        dst = Path(dst)
        if dst.parent == out and dst.name.endswith("_anomaly.nii.gz") and not marker.exists():
            marker.write_text(str(os.getpid()))
            while not release.exists():
                time.sleep(0.05)

    os.replace = replace
    from aeflow_cli.main import cli
    cli.main(["score", *sys.argv[4:], "--device", "cpu", "--quiet"], standalone_mode=True)
    """
)


def _start_paused_run(tmp_path: Path, out: Path, args: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``aeflow-cli score ARGS -o OUT`` in a subprocess that pauses once a map is renamed into ``out``."""
    marker, release = tmp_path / "paused", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN_AND_PAUSE, str(marker), str(release), str(out), *args, "-o", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before writing: {proc.stdout.read()}")
        assert time.monotonic() < deadline, "the run never reached the write"
        time.sleep(0.1)
    return proc, marker, release


def test_concurrent_run_into_the_same_folder_is_refused(small_volume_model, tmp_path):
    image = str(small_volume_model["lesioned"][0]["image"])
    model = str(small_volume_model["model"])
    out = tmp_path / "out"
    low = small_volume_model["threshold"] / 3
    proc, marker, release = _start_paused_run(tmp_path, out, [image, "-m", model, "--threshold", str(low)])
    try:
        # the first run is writing its outputs: a second run with another threshold must not interleave
        line = _one_line_error(_run(image, "-m", model, "-o", str(out), "--overwrite"))
        assert str(out) in line and "in use" in line and f"pid {proc.pid}" in line, line
    finally:
        release.write_text("go")
        output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    scores = _assert_consistent(out, output_name(image))
    assert scores["threshold"] == pytest.approx(low)
    assert _hidden(out) == []


def test_rerun_after_kill_during_overwrite_completes(small_volume_model, tmp_path):
    image = str(small_volume_model["lesioned"][0]["image"])
    name = output_name(image)
    model = str(small_volume_model["model"])
    out = tmp_path / "out"
    assert _run(image, "-m", model, "-o", str(out)).exit_code == 0
    low = small_volume_model["threshold"] / 3
    proc, _, _ = _start_paused_run(tmp_path, out, [image, "-m", model, "--overwrite", "--threshold", str(low)])
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # killed after the new map replaced the old one: the old scores JSON must not vouch for it
    scores_file = out / f"{name}_scores.json"
    if scores_file.exists():
        _assert_consistent(out, name)
    result = CliRunner().invoke(cli, ["score", image, "-m", model, "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "interrupted" in result.output and name in result.output
    _assert_consistent(out, name)
    assert _hidden(out) == []


def test_leftovers_of_a_killed_run_are_redone_without_overwrite(small_volume_model, tmp_path):
    image = str(small_volume_model["lesioned"][0]["image"])
    model = str(small_volume_model["model"])
    out = tmp_path / "out"
    out.mkdir()
    name = output_name(image)
    # what a run killed while writing left: a map without its scores JSON and hidden temporary files
    (out / f"{name}_anomaly.nii.gz").write_bytes(b"\x1f\x8b partial")
    (out / f".{name}_scores.json.abc123.tmp.json").write_text("{")
    (out / f".{name}.xyz.tmp").mkdir()
    (out / f".{name}.xyz.tmp" / f"{name}_mask.nii.gz").write_bytes(b"partial")
    result = CliRunner().invoke(cli, ["score", image, "-m", model, "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "interrupted" in result.output
    _assert_consistent(out, name)
    assert nib.load(out / f"{name}_anomaly.nii.gz").shape == nib.load(image).shape
    assert _hidden(out) == []
    # a complete set is still protected
    line = _one_line_error(_run(image, "-m", model, "-o", str(out)))
    assert "--overwrite" in line


# -- file modes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mode):
    from monai_aeflow.fileio import atomic_write_text

    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert os.umask(old) == old  # the umask was restored


def test_folder_lock_is_exclusive_and_released(tmp_path):
    from monai_aeflow.fileio import FolderLockedError
    from monai_aeflow.inference.pipeline import lock_output_folder

    out = tmp_path / "a" / "out"
    first = lock_output_folder(out)
    with pytest.raises(FolderLockedError, match=f"in use by another aeflow-cli score run \\(pid {os.getpid()}\\)"):
        lock_output_folder(out)
    first.release()
    assert not (tmp_path / "a").exists()  # the folders it created stayed empty and were removed
    with lock_output_folder(out):
        (out / "x").write_text("x")
    assert [p.name for p in out.iterdir()] == ["x"]  # no lock file left


def test_unwritable_output_folder_message(tmp_path, monkeypatch):
    import monai_aeflow.fileio as fileio
    from monai_aeflow.errors import AEFlowInputError

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fileio.os, "open", refuse)
    with pytest.raises(AEFlowInputError, match="output folder is not writable \\(Permission denied\\)"):
        fileio.FolderLock(tmp_path, ".lock", "test").acquire()
