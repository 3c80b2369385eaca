"""``save_nifti``: the ``.nii.gz`` written through ISA-L (or the standard library's gzip) holds exactly the bytes
``nibabel.save`` writes, and reads back as the same image."""

from __future__ import annotations

import gzip
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_aeflow.fileio import gzip_bytes, save_nifti


def _image(dtype=np.float32) -> nib.Nifti1Image:
    rng = np.random.default_rng(0)
    data = (rng.gamma(2.0, 0.05, (23, 19, 7)) * (rng.random((23, 19, 7)) > 0.3)).astype(dtype)
    affine = np.array([[-1.2, 0, 0, 30], [0, 1.1, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


@pytest.mark.parametrize("isal", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_nii_gz_holds_the_bytes_nibabel_writes(tmp_path, monkeypatch, isal, dtype):
    if isal:
        pytest.importorskip("isal")
    else:
        monkeypatch.setitem(sys.modules, "isal", None)  # the standard library's gzip
    img = _image(dtype)
    ours = save_nifti(img, tmp_path / "ours.nii.gz")
    nib.save(img, tmp_path / "nibabel.nii.gz")
    assert ours.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert gzip.decompress(ours.read_bytes()) == gzip.decompress((tmp_path / "nibabel.nii.gz").read_bytes())
    back = nib.load(ours)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(img.dataobj))
    np.testing.assert_allclose(back.affine, img.affine)
    assert back.get_data_dtype() == dtype
    assert not list(tmp_path.glob(".*"))  # no temporary left


def test_gzip_is_deterministic_and_plain_nii_goes_through_nibabel(tmp_path):
    data = _image().to_bytes()
    assert gzip_bytes(data) == gzip_bytes(data)
    assert gzip.decompress(gzip_bytes(data, level=9)) == data
    img = _image()
    save_nifti(img, tmp_path / "plain.nii")
    nib.save(img, tmp_path / "ref.nii")
    assert (tmp_path / "plain.nii").read_bytes() == (tmp_path / "ref.nii").read_bytes()


def _variant(kind: str) -> nib.Nifti1Image:
    """Images that take the one-copy path of ``nifti_bytes`` and images that go through nibabel's writer."""
    rng = np.random.default_rng(1)
    data = rng.random((21, 17, 6), dtype=np.float32)
    data[0, 0, 0] = np.nan
    affine = np.diag([-1.5, 1.0, 2.5, 1.0])
    donor = nib.Nifti1Header()  # a header copied from an input, with its own offset and descriptions
    donor.set_data_offset(400)
    donor["descrip"] = b"input scan"
    arrays = {
        "float32": (data, np.float32, None),
        "float32 from input header": (data, np.float32, donor),
        "uint8": ((data > 0.5).astype(np.uint8), np.uint8, donor),
        "int16 4D": ((rng.random((5, 4, 3, 2)) * 1000).astype(np.int16), np.int16, None),
        "fortran": (np.asfortranarray(data), np.float32, None),
        "float64 cast to float32 (nibabel)": (data.astype(np.float64), np.float32, None),
        "nan scaling (nibabel)": ((data > 0.5).astype(np.uint8), np.uint8, None),
        "big-endian header (nibabel)": (data, np.float32, nib.Nifti1Header(endianness=">")),
    }
    arr, dtype, header = arrays[kind]
    img = nib.Nifti1Image(arr, affine, header=None if header is None else header.copy())
    img.set_data_dtype(dtype)
    if "nan scaling" not in kind:
        img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    return img


@pytest.mark.parametrize(
    "kind",
    [
        "float32",
        "float32 from input header",
        "uint8",
        "int16 4D",
        "fortran",
        "float64 cast to float32 (nibabel)",
        "nan scaling (nibabel)",
        "big-endian header (nibabel)",
    ],
)
def test_nifti_bytes_equal_nibabel_to_bytes(kind):
    """``nifti_bytes`` gives exactly ``to_bytes()``'s bytes (two identical fresh images, ours first, as in use),
    and leaves the header's stored data offset as it was."""
    from monai_aeflow.fileio import nifti_bytes

    ours_img, ref_img = _variant(kind), _variant(kind)
    offset = ours_img.header.get_data_offset()
    ours = nifti_bytes(ours_img)
    assert ours == ref_img.to_bytes()
    assert ours_img.header.get_data_offset() == offset
    back = nib.Nifti1Image.from_bytes(ours)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(ref_img.dataobj).astype(back.get_data_dtype()))
