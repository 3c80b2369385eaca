"""Cheap checks of the files of a data list before a dataset loads them (NIfTI sizes, PNG checksums, JPEG ends).

Example::

    check_data_files(records)  # raises AEFlowInputError naming the first unreadable or truncated file
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from monai_aeflow.data.io import check_nifti_header, file_kind
from monai_aeflow.errors import AEFlowInputError

__all__ = ["check_data_files"]


def _gzip_size_ok(path: Path, expected: int) -> str | None:
    """Compare the gzip trailer (uncompressed size mod 2**32) with ``expected``; decompress only on a mismatch."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() >= 4:
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return None
    # several gzip members (bgzip, pigz -i) have the last member's size in the trailer: count the bytes
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        return f"is truncated or corrupt ({type(exc).__name__}: {exc})"
    if size < expected:
        return f"is truncated: {size} bytes of header and voxels, the header needs {expected}"
    return None


def _check_nifti_file(path: Path) -> None:
    check_nifti_header(path)
    image = nib.load(str(path))
    shape = image.header.get_data_shape()
    expected = int(image.dataobj.offset) + int(np.prod(shape, dtype=np.int64)) * image.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        problem = _gzip_size_ok(path, expected)
    else:
        size = path.stat().st_size
        problem = f"is truncated: {size} bytes, the header needs {expected}" if size < expected else None
    if problem:
        raise AEFlowInputError(problem, path=path)


def _check_image_file(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            name = path.name.lower()
            if name.endswith(".png"):
                image.verify()  # chunk CRCs, without decoding
                return
            if name.endswith((".jpg", ".jpeg")):
                with open(path, "rb") as handle:
                    handle.seek(-2, os.SEEK_END)
                    if handle.read(2) == b"\xff\xd9":  # the end-of-image marker: not truncated
                        return
            image.load()
    except Exception as exc:  # Pillow raises several exception types for broken files
        raise AEFlowInputError(f"not a readable image ({type(exc).__name__}: {exc})", path=path) from exc


def check_data_files(records: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("image", "mask", "label")) -> None:
    """Check the files of a data list cheaply before a dataset loads them, in path order.

    NIfTI files: the header must read and the file must hold the voxels the header announces (the size of an
    uncompressed file; the gzip trailer of a compressed one, decompressing the file only when the trailer
    disagrees). PNG files: chunk checksums; JPEG files: the end-of-image marker (otherwise a full decode);
    other 2D images: a full decode. DICOM and ITK files: they must exist.

    Args:
        records: data-list records.
        keys: the record keys that may hold file paths (other values, e.g. integer labels, are skipped).

    Raises:
        AEFlowInputError: the first unreadable, truncated or missing file, named in one line.
    """
    paths = sorted({str(r[k]) for r in records for k in keys if isinstance(r.get(k), (str, os.PathLike))})
    for name in paths:
        path = Path(name)
        kind = file_kind(path)
        if kind == "nifti":
            _check_nifti_file(path)
        elif kind == "image2d":
            _check_image_file(path)
