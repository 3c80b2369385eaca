"""Test helpers: a NIfTI volume written as a DICOM MR series (pydicom), and the frames of a DICOM object read back.

The series has one file per slice of the volume's last axis: pixel ``(r, c)`` of slice ``k`` is voxel ``(c, r, k)``,
and its ``ImagePositionPatient`` / ``ImageOrientationPatient`` / ``PixelSpacing`` come from the NIfTI affine (RAS,
turned into DICOM's LPS), so MONAI's ITK reader builds the same grid back.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

_LPS = np.diag([-1.0, -1.0, 1.0])


def write_series(nifti: str | Path, folder: str | Path, patient_id: str = "AEFLOW-TEST") -> dict[str, str]:
    """Write a 3D NIfTI volume as a DICOM MR series (uint16 pixels, one file per slice).

    Args:
        nifti: the volume.
        folder: the series folder (created).
        patient_id: the patient's id.

    Returns:
        The study, series and frame-of-reference UIDs.
    """
    img = nib.load(str(nifti))
    data = np.asarray(img.dataobj, dtype=np.float64)
    affine = img.affine
    lo, hi = float(data.min()), float(data.max())
    pixels = np.rint((data - lo) / max(hi - lo, 1e-12) * 4000).astype(np.uint16)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir = _LPS @ affine[:3, 0] / spacing[0]  # along a row: increasing column index = array axis 0
    col_dir = _LPS @ affine[:3, 1] / spacing[1]  # down a column: increasing row index = array axis 1
    uids = {
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "FrameOfReferenceUID": generate_uid(),
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out / f"slice{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
        ds.FrameOfReferenceUID = uids["FrameOfReferenceUID"]
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Test^Synthetic", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.Manufacturer = "synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ImagePositionPatient = [float(v) for v in _LPS @ (affine @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        ds.save_as(out / f"slice{k:04d}.dcm", write_like_original=False)
    return uids


def frame_world_lookup(ds: pydicom.Dataset, frame: int, nifti: nib.Nifti1Image) -> np.ndarray:
    """The NIfTI voxels at the pixel centres of one frame of an enhanced DICOM object (its own geometry).

    Brute force: every pixel's patient position from the frame's ``ImagePositionPatient``, the shared orientation
    and pixel spacing, then the NIfTI affine inverted, rounded to the nearest voxel (which must lie within 0.01).
    """
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float).reshape(2, 3)
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    ipp = np.asarray(ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient, float)
    r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    lps = ipp + c[..., None] * spacing[1] * iop[0] + r[..., None] * spacing[0] * iop[1]
    ras = np.concatenate([lps @ _LPS, np.ones(r.shape + (1,))], axis=-1)
    ijk = ras @ np.linalg.inv(nifti.affine).T
    idx = np.rint(ijk[..., :3]).astype(int)
    assert np.abs(ijk[..., :3] - idx).max() < 0.01
    return np.asanyarray(nifti.dataobj)[idx[..., 0], idx[..., 1], idx[..., 2]]
