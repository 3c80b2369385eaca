"""DICOM out: ``aeflow-cli score --dicom-out`` writes a DICOM SEG and a Parametric Map that reference the series.

The series is a synthetic lesioned volume of ``tests/conftest.py`` written as DICOM with pydicom
(``tests/dicom_series.py``), scored by the small model trained there; the real series in ``../shared/data`` is
checked too when present. Everything read back is compared with the source slices (UIDs, positions, orientation,
spacing) and, voxel by voxel, with the NIfTI outputs of the same run, located through the DICOM objects' own
geometry (a brute-force lookup, independent of the writer's).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from dicom_series import frame_world_lookup, write_series  # noqa: E402

from aeflow_cli.main import cli  # noqa: E402
from monai_aeflow.errors import AEFlowInputError  # noqa: E402
from monai_aeflow.inference.dicom import volume_to_frames  # noqa: E402

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


def _score(series: Path, model: Path, out: Path, *extra: str):
    args = ["score", str(series), "--model", str(model), "--out", str(out), "--device", "cpu", "--quiet"]
    return CliRunner().invoke(cli, [*args, "--no-preview", *extra])


def _sources(folder: Path) -> dict[str, pydicom.Dataset]:
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.suffix == ".dcm"]
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def _check_references(obj: pydicom.Dataset, sources: dict[str, pydicom.Dataset]) -> list[pydicom.Dataset]:
    """UIDs and geometry of a SEG / Parametric Map against the source series; returns the source of each frame."""
    first = next(iter(sources.values()))
    assert obj.StudyInstanceUID == first.StudyInstanceUID
    assert obj.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert obj.SeriesInstanceUID != first.SeriesInstanceUID
    (ref_series,) = obj.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence} == set(sources)
    assert int(obj.NumberOfFrames) == len(sources)
    assert (int(obj.Rows), int(obj.Columns)) == (int(first.Rows), int(first.Columns))
    shared = obj.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
        np.asarray(first.ImageOrientationPatient, float),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float), np.asarray(first.PixelSpacing, float)
    )
    by_position = {tuple(np.round(np.asarray(ds.ImagePositionPatient, float), 3)): ds for ds in sources.values()}
    frame_sources = []
    for frame in obj.PerFrameFunctionalGroupsSequence:
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        source = by_position[tuple(np.round(position, 3))]  # a frame lies exactly on a source slice
        derivation = frame.get("DerivationImageSequence")
        if derivation:  # the SEG also names the slice each frame comes from
            assert derivation[0].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        frame_sources.append(source)
    assert len({str(s.SOPInstanceUID) for s in frame_sources}) == len(sources)  # one frame per source slice
    return frame_sources


def _check_outputs(series: Path, out: Path, name: str, frames: list[int] | None = None) -> None:
    sources = _sources(series)
    seg = pydicom.dcmread(out / f"{name}_seg.dcm")
    pmap = pydicom.dcmread(out / f"{name}_pmap.dcm")
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.SegmentSequence[0].SegmentLabel == "anomaly"
    assert pmap.SOPClassUID == PARAMETRIC_MAP_STORAGE
    _check_references(seg, sources)
    _check_references(pmap, sources)
    mask_nii = nib.load(out / f"{name}_mask.nii.gz")
    map_nii = nib.load(out / f"{name}_anomaly.nii.gz")
    seg_pixels, map_pixels = seg.pixel_array, pmap.pixel_array
    assert map_pixels.dtype == np.float32
    mapping = pmap.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    slope, intercept = float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)
    lesion = 0
    for k in frames if frames is not None else range(int(seg.NumberOfFrames)):
        np.testing.assert_array_equal(seg_pixels[k], frame_world_lookup(seg, k, mask_nii))
        np.testing.assert_array_equal(map_pixels[k] * slope + intercept, frame_world_lookup(pmap, k, map_nii))
        lesion += int(seg_pixels[k].sum())
    assert lesion > 0


@pytest.fixture(scope="module")
def dicom_case(small_volume_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_case")
    series = root / "case_series"
    write_series(small_volume_model["lesioned"][0]["image"], series)
    return {"series": series, "model": small_volume_model["model"], "root": root}


def test_dicom_out_writes_seg_and_parametric_map_matching_the_nifti_outputs(dicom_case):
    out = dicom_case["root"] / "out"
    res = _score(dicom_case["series"], dicom_case["model"], out, "--dicom-out")
    assert res.exit_code == 0, res.output
    _check_outputs(dicom_case["series"], out, "case_series")
    listed = __import__("json").loads((out / "case_series_scores.json").read_text())["output_files"]
    assert {"seg", "pmap"} <= set(listed)  # part of the output group, with sizes and checksums
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"case_series_{s}" for s in ("anomaly.nii.gz", "mask.nii.gz", "scores.json", "seg.dcm", "pmap.dcm")
    )


def test_resume_keeps_dicom_outputs_and_refuses_a_group_without_them(dicom_case):
    out = dicom_case["root"] / "out_resume"
    assert _score(dicom_case["series"], dicom_case["model"], out).exit_code == 0  # NIfTI outputs only
    res = _score(dicom_case["series"], dicom_case["model"], out, "--dicom-out", "--resume")
    assert res.exit_code == 2 and "without its pmap file" in res.output and "Traceback" not in res.output
    assert not (out / "case_series_pmap.dcm").exists()
    assert _score(dicom_case["series"], dicom_case["model"], out, "--dicom-out", "--overwrite").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = _score(dicom_case["series"], dicom_case["model"], out, "--dicom-out", "--resume")
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # kept as they were


def test_dicom_out_refuses_an_input_that_is_not_a_dicom_series(small_volume_model, tmp_path):
    out = tmp_path / "out"
    res = _score(small_volume_model["lesioned"][0]["image"], small_volume_model["model"], out, "--dicom-out")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines == [f"Error: {small_volume_model['lesioned'][0]['image']}: " + lines[0].split(": ", 2)[2]], lines
    assert "--dicom-out needs DICOM series" in res.output and "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())


def test_volume_to_frames_gives_the_series_pixels_and_refuses_another_grid(dicom_case, small_volume_model):
    from monai_aeflow.inference.dicom import read_series

    datasets = read_series(dicom_case["series"])
    nii = nib.load(small_volume_model["lesioned"][0]["image"])  # the volume the series was written from
    volume = np.asanyarray(nii.dataobj).astype(np.float64)
    scaled = np.rint((volume - volume.min()) / (volume.max() - volume.min()) * 4000).astype(np.uint16)
    frames = volume_to_frames(scaled, nii.affine, datasets)
    np.testing.assert_array_equal(frames, np.stack([ds.pixel_array for ds in datasets]))
    shifted = nii.affine.copy()
    shifted[:3, 3] += nii.affine[:3, 0] * 0.5  # half a voxel off
    with pytest.raises(AEFlowInputError, match="does not match"):
        volume_to_frames(scaled, shifted, datasets)
    with pytest.raises(AEFlowInputError, match="not a DICOM series"):
        read_series(dicom_case["root"] / "no_such_folder")


@pytest.mark.realdata
def test_dicom_out_on_the_real_series(shared_data, small_volume_model, tmp_path):
    series = shared_data / "dicom_t1_series"
    if not series.is_dir():
        pytest.skip(f"{series} not present")
    res = _score(series, small_volume_model["model"], tmp_path, "--dicom-out", "--threshold", "0.05")
    assert res.exit_code == 0, res.output
    n = len(_sources(series))
    _check_outputs(series, tmp_path, "dicom_t1_series", frames=sorted({0, n // 3, n // 2, 2 * n // 3, n - 1}))
