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
