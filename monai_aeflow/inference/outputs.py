"""The output files of a scored input: names, NIfTI / 2D writers, group commit, state and the folder lock.

:func:`write_outputs` writes the NIfTI map, the binary lesion mask, the JSON of scores and a PNG preview of a
:class:`~monai_aeflow.inference.result.ScoreResult` as one group (the JSON last, as the commit marker);
:func:`output_state` tells a complete group from one an interrupted run left behind, and :func:`kept_outputs` checks
that a complete group is what a resumed run would write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from monai_aeflow.data.io import IMAGE_2D_SUFFIXES
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import FolderLock, atomic_write, atomic_write_json, save_nifti
from monai_aeflow.visualize import most_anomalous_slices, save_slice_panel

if TYPE_CHECKING:
    from monai_aeflow.inference.result import ScoreResult

__all__ = [
    "SCORE_LOCK_NAME",
    "kept_outputs",
    "lock_output_folder",
    "output_name",
    "output_paths",
    "output_state",
    "remove_leftovers",
    "write_outputs",
    "write_scores_summary",
]

SCORE_LOCK_NAME = ".aeflow-score.lock"
"""Lock file that an ``aeflow-cli score`` run (:func:`score_paths`) holds in its output folder."""

_KINDS = ("volume", "image2d")


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def output_name(path: str | os.PathLike) -> str:
    """The name outputs of an input are written under (file name without ``.nii.gz`` and the like).

    Args:
        path: an input file or DICOM folder.

    Returns:
        The stem, e.g. ``BraTS2021_00000_flair`` for ``BraTS2021_00000_flair.nii.gz``.
    """
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".dcm", *IMAGE_2D_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_paths(name: str, out_dir: str | os.PathLike, kind: str = "volume") -> dict[str, Path]:
    """The files written for one input.

    Args:
        name: the output name (see :func:`output_name`).
        out_dir: the output folder.
        kind: ``"volume"`` or ``"image2d"``.

    Returns:
        ``{"anomaly", "mask", "scores", "preview"}`` paths.
    """
    out = Path(out_dir)
    if kind == "image2d":
        return {
            "anomaly": out / f"{name}_anomaly.tif",
            "mask": out / f"{name}_mask.png",
            "scores": out / f"{name}_scores.json",
            "preview": out / f"{name}_preview.png",
        }
    return {
        "anomaly": out / f"{name}_anomaly.nii.gz",
        "mask": out / f"{name}_mask.nii.gz",
        "scores": out / f"{name}_scores.json",
        "preview": out / f"{name}_preview.png",
    }


def _save_nifti(array: np.ndarray, affine: np.ndarray, header: Any, path: Path, dtype: Any) -> None:
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0  # stored as is (no scaling of a copied header)
    save_nifti(img, path)


def _save_2d(array: np.ndarray, path: Path, as_mask: bool) -> None:
    from PIL import Image

    # MONAI's image reader returns (width, height); PIL wants (height, width)
    pixels = np.ascontiguousarray(array.T)
    img = (
        Image.fromarray((pixels > 0).astype(np.uint8) * 255) if as_mask else Image.fromarray(pixels.astype(np.float32))
    )
    suffix = path.suffix.lstrip(".")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG" if suffix == "png" else "TIFF"))


def _file_entry(path: Path) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def output_state(name: str, out_dir: str | os.PathLike, kind: str = "volume") -> str:
    """Whether the outputs of one input are absent, complete or left incomplete by an interrupted run.

    The scores JSON is written last (see :func:`write_outputs`), so it marks a complete group: outputs without
    a readable scores JSON are what a run killed while writing left behind.

    Args:
        name: the output name (see :func:`output_name`).
        out_dir: the output folder.
        kind: ``"volume"`` or ``"image2d"``.

    Returns:
        ``"absent"`` (no output file), ``"complete"`` (a readable scores JSON) or ``"incomplete"``.
    """
    paths = output_paths(name, out_dir, kind)
    scores = paths["scores"]
    if scores.exists():
        try:
            if isinstance(json.loads(scores.read_text(encoding="utf-8")), dict):
                return "complete"
        except (OSError, ValueError):
            pass
        return "incomplete"
    return "incomplete" if any(p.exists() for p in paths.values()) else "absent"


def _input_mtime(path: Path) -> float:
    """The newest modification time of an input: the file, or a DICOM series folder and the files in it."""
    times = [path.stat().st_mtime]
    if path.is_dir():
        times += [entry.stat().st_mtime for entry in path.iterdir() if entry.is_file()]
    return max(times)


def kept_outputs(
    name: str,
    out_dir: str | os.PathLike,
    kind: str,
    source: str | os.PathLike,
    model_sha256: str,
    threshold: float | None,
    postprocessing: Mapping[str, Any],
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """The scores of a complete output group that a resumed run keeps instead of scoring its input again.

    The group is kept only if it is what this run would write: made with the same model file (its SHA-256), the
    same threshold and post-processing, every file its scores JSON lists still there with its recorded size, and
    the input not modified after the scores JSON was written.

    Args:
        name: the output name (see :func:`output_name`).
        out_dir: the output folder.
        kind: ``"volume"`` or ``"image2d"``.
        source: the input file or DICOM series folder.
        model_sha256: SHA-256 of this run's model file.
        threshold: this run's binarisation threshold (None: no lesion mask).
        postprocessing: this run's post-processing parameters (``PostprocessConfig.to_dict()``).
        required: keys of files this run writes that the group must hold too (e.g. ``"pmap"`` with DICOM outputs).

    Returns:
        The stored scores (the parsed ``NAME_scores.json``).

    Raises:
        AEFlowInputError: the group differs from what this run would write; the message names the scores file,
            the difference and ``--overwrite``.
    """
    scores_path = output_paths(name, out_dir, kind)["scores"]
    scores = json.loads(scores_path.read_text(encoding="utf-8"))
    hint = "; use --overwrite to score it again"
    model = dict(scores.get("model") or {})
    if model.get("model_sha256") != model_sha256:
        raise AEFlowInputError(f"was written with another model file ({model.get('model_file')}){hint}", scores_path)
    if scores.get("threshold") != threshold:
        raise AEFlowInputError(
            f"was written with threshold {scores.get('threshold')}, this run uses {threshold}{hint}", scores_path
        )
    if scores.get("postprocessing") != json.loads(json.dumps(dict(postprocessing))):
        raise AEFlowInputError(f"was written with other post-processing settings{hint}", scores_path)
    files = dict(scores.get("output_files") or {})
    missing = [key for key in required if key not in files]
    if missing:
        raise AEFlowInputError(
            f"was written without its {', '.join(missing)} file, which this run writes{hint}", scores_path
        )
    for entry in files.values():
        path = Path(out_dir) / str(entry.get("name"))
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            raise AEFlowInputError(
                f"lists {entry.get('name')} ({entry.get('bytes')} bytes), which is missing or has another size{hint}",
                scores_path,
            )
    if _input_mtime(Path(source)) > scores_path.stat().st_mtime:
        raise AEFlowInputError(f"is older than its input {source}, modified since it was scored{hint}", scores_path)
    return scores


def remove_leftovers(out_dir: str | os.PathLike, names: Iterable[str], files: Iterable[str] = ()) -> list[str]:
    """Remove the hidden temporary files and folders that interrupted writes of these outputs left behind.

    Call it only while holding the output folder's lock (:func:`lock_output_folder`): a running writer's
    temporaries look the same.

    Args:
        out_dir: the output folder.
        names: output names (see :func:`output_name`); their staging folders ``.NAME.*.tmp`` and the
            temporaries ``.NAME_anomaly.nii.gz.*.tmp*`` (and the like) of :func:`~monai_aeflow.fileio.atomic_write`
            are removed.
        files: other file names in the folder whose temporaries are removed (e.g. ``summary.csv``).

    Returns:
        The names removed.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return []
    prefixes = []
    for name in names:
        prefixes.append(f".{name}.")
        for kind in _KINDS:
            prefixes += [f".{p.name}." for p in output_paths(name, out, kind).values()]
    prefixes += [f".{f}." for f in files]
    removed = []
    for entry in out.iterdir():
        if not (entry.name.startswith(".") and ".tmp" in entry.name and entry.name.startswith(tuple(prefixes))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def lock_output_folder(out_dir: str | os.PathLike) -> FolderLock:
    """Create the output folder if needed, check that it is writable and lock it against other score runs.

    Args:
        out_dir: the output folder.

    Returns:
        The held lock (release it with ``release()`` or use it as a context manager).

    Raises:
        AEFlowInputError: the folder cannot be created or written, or another run holds it
            (:class:`~monai_aeflow.fileio.FolderLockedError`).
    """
    return FolderLock(out_dir, SCORE_LOCK_NAME, "aeflow-cli score run").acquire()


def _commit(staged: Path, dest: Path) -> None:
    os.replace(staged, dest)


def write_outputs(
    result: ScoreResult,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    preview: bool = True,
    name: str | None = None,
    extra: Callable[[ScoreResult, Path, str], Mapping[str, Path]] | None = None,
) -> dict[str, Path]:
    """Write the anomaly map, the lesion mask, the scores JSON and a preview PNG of one result, as one group.

    Volumes give ``<name>_anomaly.nii.gz`` (float32) and ``<name>_mask.nii.gz`` (uint8) with the input's
    shape and affine (and its NIfTI header when the input is NIfTI); 2D images give ``<name>_anomaly.tif``
    (float32) and ``<name>_mask.png`` with the input's size. The mask is written only when a threshold is
    known. All files are first written to a hidden staging folder ``.<name>.*.tmp`` in ``out_dir``; then an
    existing scores JSON is removed, the files are renamed into place and the scores JSON, which lists every
    file of the group with its size and SHA-256 (``output_files``), is renamed last. A run killed at any point
    therefore leaves either the previous complete group, or files without a scores JSON (which
    :func:`output_state` reports as incomplete and :func:`score_paths` redoes), never a scores JSON that
    describes other files. Files of an earlier group that this one does not write (a mask without threshold,
    a preview) are removed.

    Args:
        result: the output of :meth:`AnomalyScorer.score`.
        out_dir: the output folder (created).
        overwrite: replace existing outputs; otherwise a complete group (see :func:`output_state`) is an error
            and nothing is written. Files left incomplete by an interrupted run are replaced either way.
        preview: also write the PNG of the most anomalous slices.
        name: output name (default: from the input's file name).
        extra: writer of further files of the group (e.g.
            :func:`~monai_aeflow.inference.dicom.write_dicom_outputs`): called with the result, the staging folder
            and the name, it writes its files into the staging folder and returns ``{key: path}``; they are
            committed with the group (before the scores JSON, which lists them).

    Returns:
        The paths written (``anomaly``, ``mask`` (absent without a threshold), ``scores``, ``preview``).

    Raises:
        AEFlowInputError: the outputs exist and ``overwrite`` is False.
    """
    name = name or result.name
    group = output_paths(name, out_dir, result.kind)
    paths = dict(group)
    if result.lesion_mask is None:
        paths.pop("mask")
    if not preview:
        paths.pop("preview")
    if not overwrite and output_state(name, out_dir, result.kind) == "complete":
        existing = next(p for p in group.values() if p.exists())
        raise AEFlowInputError("output exists (use --overwrite to replace it)", path=existing)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out))
    try:
        staged = {key: stage / path.name for key, path in paths.items()}
        if result.kind == "image2d":
            _save_2d(result.anomaly_map, staged["anomaly"], as_mask=False)
            if "mask" in staged:
                _save_2d(result.lesion_mask, staged["mask"], as_mask=True)
        else:
            _save_nifti(result.anomaly_map, result.affine, result.header, staged["anomaly"], np.float32)
            if "mask" in staged:
                _save_nifti(result.lesion_mask, result.affine, result.header, staged["mask"], np.uint8)
        if "preview" in staged:
            pv = result.preview
            show = most_anomalous_slices(pv["slice_scores"], 4) or [0]
            save_slice_panel(
                staged["preview"],
                np.asarray(pv["image"]),
                show,
                reconstruction=pv["reconstruction"],
                anomaly_map=pv["anomaly_map"],
                slice_scores=pv["slice_scores"],
                title=f"{result.name}: volume score {result.scores['volume_score']:.4g}",
            )
        for key, path in dict(extra(result, stage, name) if extra is not None else {}).items():
            staged[key], paths[key] = Path(path), out / Path(path).name
        files = {key: _file_entry(path) for key, path in staged.items() if key != "scores"}
        outputs = {k: str(v) for k, v in paths.items()}
        atomic_write_json(staged["scores"], {**result.scores, "outputs": outputs, "output_files": files})
        # commit: the scores JSON goes first and comes back last, so it never describes other files
        paths["scores"].unlink(missing_ok=True)
        for key, dest in group.items():
            if key not in paths:
                dest.unlink(missing_ok=True)
        for key, dest in paths.items():
            if key != "scores":
                _commit(staged[key], dest)
        _commit(staged["scores"], paths["scores"])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return paths


def write_scores_summary(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, strict: bool = True) -> Path:
    """Write the rows of :func:`monai_aeflow.inference.score_paths` to one JSON file.

    Args:
        rows: one dict per input (``input``, ``name``, ``status``, ``volume_score``, ``outputs``...).
        path: the JSON file.
        strict: raise when an input failed (after writing the file).

    Returns:
        The file written.

    Raises:
        AEFlowInputError: ``strict`` and every failed input failed for a user's reason (a bad file, existing
            outputs without ``overwrite``): one line that lists them.
        RuntimeError: ``strict`` and another failure (the message lists them).
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    written = atomic_write_json(path, {"n_inputs": len(rows), "n_ok": len(ok), "inputs": list(rows)})
    bad = [r for r in rows if r.get("status") != "ok"]
    if strict and bad:
        message = f"{len(bad)} of {len(rows)} inputs failed: " + "; ".join(str(r.get("error")) for r in bad[:5])
        if all(r.get("user_error") for r in bad):
            raise AEFlowInputError(message)
        raise RuntimeError(message)
    return written
