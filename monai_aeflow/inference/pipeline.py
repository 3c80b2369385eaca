"""File-level anomaly scoring: a trained model file in, anomaly maps on the input's grid out.

:class:`AnomalyScorer` loads a model file (or a bundle folder), rebuilds the preprocessing stored in it,
runs the 2D model over every brain slice of a volume in batches (:func:`~monai_aeflow.inference.score_slices`)
and maps the anomaly map back through crop/pad, resampling and reorientation so that it overlays the input
voxel for voxel. :func:`write_outputs` writes the NIfTI map, the binary lesion mask, the JSON of scores and a
PNG preview as one group (the JSON last, as the commit marker); :func:`score_paths` does all of it for many
inputs, overlapping loading with the model, while holding a lock on the output folder.

Before an input is loaded its header is checked against a voxel limit (a corrupt or hostile header cannot
drive a huge allocation) and a DICOM series is checked for unreadable slice files and non-uniform slice
spacing (MONAI's ITK reader would drop the slice and stack the rest at one spacing).

Example::

    scorer = AnomalyScorer("runs/brats/model.pt", device="cuda")
    result = scorer.score("BraTS2021_00000_flair.nii.gz")
    write_outputs(result, "out/")   # out/BraTS2021_00000_flair_anomaly.nii.gz, _mask.nii.gz, _scores.json, .png
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Invertd

from monai_aeflow.checkpoint import load_model
from monai_aeflow.data.io import (
    DEFAULT_MAX_VOXELS,
    IMAGE_2D_SUFFIXES,
    IrregularSeriesError,
    check_dicom_series,
    check_voxel_limit,
    file_kind,
    is_dicom_series_dir,
    reraise_input_errors,
)
from monai_aeflow.data.transforms import build_image_preprocessing, build_volume_preprocessing
from monai_aeflow.errors import AEFlowInputError, CheckpointError
from monai_aeflow.evaluation.postprocess import PostprocessConfig, postprocess_map, segment
from monai_aeflow.fileio import FolderLock, atomic_write, atomic_write_json
from monai_aeflow.inference.volume import score_slices, score_volume
from monai_aeflow.visualize import most_anomalous_slices, save_slice_panel

__all__ = [
    "AnomalyScorer",
    "ScoreResult",
    "SCORE_LOCK_NAME",
    "expand_inputs",
    "lock_output_folder",
    "output_name",
    "output_paths",
    "output_state",
    "preprocessing_from_config",
    "remove_leftovers",
    "resolve_model_path",
    "score_paths",
    "write_outputs",
]

SCORE_LOCK_NAME = ".aeflow-score.lock"
"""Lock file that an ``aeflow-cli score`` run (:func:`score_paths`) holds in its output folder."""

BUNDLE_MODEL_FILES = ("models/model.pt", "model.pt")
_KINDS = ("volume", "image2d")
VOLUME_SCORE_METHOD = "mean anomaly map over brain voxels (input grid)"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """The model file behind a path: the file itself, or ``models/model.pt`` of a bundle folder.

    Args:
        model: a ``.pt`` model file or a bundle (or training output) folder.

    Returns:
        The model file.

    Raises:
        CheckpointError: nothing usable at that path.
    """
    path = Path(model)
    if path.is_file():
        return path
    if path.is_dir():
        for rel in BUNDLE_MODEL_FILES:
            if (path / rel).is_file():
                return path / rel
        raise CheckpointError(
            f"folder holds no trained model ({' or '.join(BUNDLE_MODEL_FILES)}); train the bundle first", path=path
        )
    raise CheckpointError("model file not found", path=path)


def _kwargs_for(builder: Callable[..., Any], config: Mapping[str, Any]) -> dict[str, Any]:
    accepted = set(inspect.signature(builder).parameters) - {"image_key", "mask_key", "label_key"}
    out = {k: v for k, v in config.items() if k in accepted}
    if "percentiles" in out:
        out["percentiles"] = tuple(out["percentiles"])
    return out


def preprocessing_from_config(config: Mapping[str, Any], kind: str = "volume") -> Callable[[dict], dict]:
    """Rebuild the training preprocessing from the configuration stored in a model file.

    Args:
        config: the model file's ``config["preprocessing"]`` (keyword arguments of
            :func:`~monai_aeflow.data.transforms.build_volume_preprocessing` or
            :func:`~monai_aeflow.data.transforms.build_image_preprocessing`; other keys are ignored).
        kind: ``"volume"`` (NIfTI, DICOM, MetaImage) or ``"image2d"`` (PNG, JPEG...).

    Returns:
        The invertible preprocessing pipeline (keys ``image``, ``mask``, ``label``).
    """
    if kind == "image2d":
        return build_image_preprocessing(**_kwargs_for(build_image_preprocessing, config))
    return build_volume_preprocessing(**_kwargs_for(build_volume_preprocessing, config))


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


@dataclass
class ScoreResult:
    """What :meth:`AnomalyScorer.score` returns for one input.

    Attributes:
        source: the input file or folder.
        name: output name (see :func:`output_name`).
        kind: ``"volume"`` or ``"image2d"``.
        anomaly_map: float32 map on the input's grid (the file's array shape, and for 2D images the
            ``(width, height)`` order of MONAI's image reader), zero outside the brain mask.
        lesion_mask: uint8 post-processed binary mask at the threshold, or None when no threshold is known.
        brain_mask: uint8 brain mask on the input's grid.
        affine: 4x4 voxel-to-world (RAS) matrix of the input.
        scores: volume score, per-slice scores, threshold, lesion size, model identity (JSON-ready).
        preview: preprocessed ``image``, ``reconstruction`` and ``anomaly_map`` (model grid) for the preview.
        header: the NIfTI header of a NIfTI input (kept on the outputs), else None.
    """

    source: str
    name: str
    kind: str
    anomaly_map: np.ndarray
    lesion_mask: np.ndarray | None
    brain_mask: np.ndarray
    affine: np.ndarray
    scores: dict[str, Any]
    preview: dict[str, np.ndarray] = field(default_factory=dict)
    header: Any = None


def _finite_list(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=float)]


class AnomalyScorer:
    """Scores NIfTI / DICOM volumes and 2D images with a trained model file, on the input's grid.

    The preprocessing (orientation, resampling, intensity scaling, crop/pad) is rebuilt from the model
    file's stored configuration; the image score and map follow its ``score`` settings; the lesion mask
    uses the threshold and post-processing stored by ``aeflow-cli evaluate --checkpoint MODEL`` unless a
    threshold is given.

    Args:
        model: a model file or a bundle folder (``models/model.pt``).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        batch_size: slices per forward pass (``None``: 32 on CUDA, about 262k pixels per batch on CPU, see
            :func:`~monai_aeflow.inference.default_batch_size`).
        threshold: binarisation threshold of the post-processed map (default: the model's, if any).
        amp: float16 autocast (default: on for CUDA).
        min_brain_voxels: axial slices with fewer brain voxels than this are not scored (map 0, score null).
        postprocessing: overrides of the stored post-processing (see
            :class:`~monai_aeflow.evaluation.postprocess.PostprocessConfig`).
        max_voxels: inputs whose header implies more voxels (times channels) are refused before loading
            (``None``: no limit).
        accept_irregular_series: score a DICOM series with unreadable slice files or non-uniform spacing as
            MONAI's ITK reader loads it (readable slices stacked at one spacing) and record the problems in the
            scores as ``irregular_series``; by default such a series is refused.

    Raises:
        CheckpointError: missing, unsafe or foreign model file.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        threshold: float | None = None,
        amp: bool | None = None,
        min_brain_voxels: int = 1,
        postprocessing: Mapping[str, Any] | None = None,
        max_voxels: int | None = DEFAULT_MAX_VOXELS,
        accept_irregular_series: bool = False,
    ) -> None:
        from monai_aeflow.engines.workflow import resolve_device

        if batch_size is not None and batch_size < 1:
            raise AEFlowInputError(f"batch size must be at least 1, got {batch_size}")
        if max_voxels is not None and max_voxels < 1:
            raise AEFlowInputError(f"the voxel limit must be at least 1, got {max_voxels}")
        self.max_voxels = None if max_voxels is None else int(max_voxels)
        self.accept_irregular_series = bool(accept_irregular_series)
        self.device = resolve_device(device)
        self.model_path = resolve_model_path(model)
        self.network, self.checkpoint = load_model(self.model_path, self.device)
        self.network = self.network.to(memory_format=torch.channels_last)  # faster convolutions on CPU and CUDA
        config = self.checkpoint["config"]
        self.model_name = str(config.get("model_name", "aeflow"))
        self.preprocessing_config = dict(config.get("preprocessing") or {})
        score_cfg = dict(config.get("score") or {})
        self.beta = float(score_cfg.get("beta", 0.9))
        self.map_kind = str(score_cfg.get("map_kind", "residual"))
        self.in_channels = int(config["model"].get("in_channels", 1))
        self.batch_size = None if batch_size is None else int(batch_size)
        self.amp = amp
        self.min_brain_voxels = int(min_brain_voxels)
        stored = self.checkpoint.get("threshold")
        self.threshold = float(threshold) if threshold is not None else (None if stored is None else float(stored))
        self.threshold_source = "given" if threshold is not None else ("model" if stored is not None else None)
        protocol = dict(self.checkpoint.get("threshold_protocol") or {})
        pp = {k: v for k, v in dict(protocol.get("postprocessing") or {}).items() if k in _PP_FIELDS}
        pp.update(postprocessing or {})
        self.postprocess_config = PostprocessConfig(**pp)
        self._pipelines = {kind: preprocessing_from_config(self.preprocessing_config, kind) for kind in _KINDS}
        self.identity = {
            "model_file": str(self.model_path.resolve()),
            "model_sha256": _sha256(self.model_path),
            "model_name": self.model_name,
            "network": dict(config["model"]),
            "preprocessing": self.preprocessing_config,
            "score": {"beta": self.beta, "map_kind": self.map_kind},
            "format": self.checkpoint.get("format"),
        }

    # -- preprocessing -------------------------------------------------------------------------------------
    def pipeline(self, kind: str) -> Callable[[dict], dict]:
        """The preprocessing of one input kind (``"volume"`` or ``"image2d"``), built once per scorer."""
        return self._pipelines[kind]

    def preprocess(self, image: str | os.PathLike, mask: str | os.PathLike | None = None) -> dict[str, Any]:
        """Load and preprocess one input (safe to call from worker threads).

        Args:
            image: a NIfTI / MetaImage / NRRD file, a DICOM series folder or a 2D image.
            mask: an optional brain-mask file on the same grid.

        Returns:
            The preprocessed data dict (``image``, ``mask`` MetaTensors with their transform history) plus
            ``kind`` and ``source``.

        Raises:
            AEFlowInputError: missing, unreadable, 4D, too thin, too large (header beyond ``max_voxels``) or
                wrongly-shaped input (message names the file).
            IrregularSeriesError: a DICOM series with unreadable slice files or non-uniform slice spacing,
                unless ``accept_irregular_series``.
        """
        source_kind = file_kind(image)
        kind = "image2d" if source_kind == "image2d" else "volume"
        if mask is not None and not Path(mask).exists():
            raise AEFlowInputError("brain mask not found", path=mask)
        # header only: nothing is allocated for an image that is too large
        check_voxel_limit(image, self.max_voxels)
        if mask is not None:
            check_voxel_limit(mask, self.max_voxels)
        irregular = self._check_series(image) if source_kind == "dicom" else None
        with reraise_input_errors():
            data = self.pipeline(kind)(
                {"image": str(image), "mask": None if mask is None else str(mask), "label": None}
            )
        shape = tuple(int(s) for s in data["image"].meta.get("spatial_shape", data["image"].shape[1:]))
        if kind == "volume":
            if len(shape) == 3 and (min(shape[:2]) < 3 or shape[2] == 2):
                raise AEFlowInputError(
                    f"is only {min(shape)} voxels thick (shape {shape}); expected a 3D volume of at least 3 slices "
                    "or a single 2D slice",
                    path=image,
                )
        channels = int(data["image"].shape[0])
        if channels != self.in_channels:
            raise AEFlowInputError(
                f"has {channels} channel(s) but the model was trained on {self.in_channels} "
                f"(modalities: {self.preprocessing_config.get('modalities', 'see the model configuration')})",
                path=image,
            )
        data["kind"] = kind
        data["source"] = str(image)
        if irregular is not None:
            irregular["slices_loaded"] = int(shape[-1])
            data["irregular_series"] = irregular
        return data

    def _check_series(self, folder: str | os.PathLike) -> dict[str, Any] | None:
        info = check_dicom_series(folder)
        if not info.problems:
            return None
        listed = "; ".join(info.problems[:3]) + (
            f"; and {len(info.problems) - 3} more" if len(info.problems) > 3 else ""
        )
        if not self.accept_irregular_series:
            raise IrregularSeriesError(
                f"irregular DICOM series: {listed} (use --accept-irregular-series to score it as loaded)", path=folder
            )
        return {
            "problems": list(info.problems),
            "action": "scored as loaded (accept_irregular_series): MONAI's ITK reader skipped unreadable slice "
            "files and stacked the others at one spacing, so the map's slices may not line up with the series' "
            "slice positions",
            "slice_files": len(info.files),
            "median_slice_spacing_mm": info.spacing,
        }

    # -- scoring -------------------------------------------------------------------------------------------
    def score(self, image: str | os.PathLike, mask: str | os.PathLike | None = None) -> ScoreResult:
        """Load, preprocess and score one input.

        Args:
            image: a NIfTI / MetaImage / NRRD file, a DICOM series folder or a 2D image.
            mask: an optional brain-mask file on the same grid.

        Returns:
            A :class:`ScoreResult` on the input's grid.
        """
        return self.score_preprocessed(self.preprocess(image, mask))

    def score_preprocessed(self, data: Mapping[str, Any]) -> ScoreResult:
        """Score a data dict returned by :meth:`preprocess`.

        Args:
            data: the preprocessed input.

        Returns:
            A :class:`ScoreResult` on the input's grid.
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if data["kind"] == "image2d":
            result = self._score_image(data, timings)
        else:
            result = self._score_volume(data, timings)
        timings["postprocess_seconds"] = time.perf_counter() - t0 - timings["model_seconds"]
        result.scores["timing"] = timings
        return result

    def _timed_model(self, run: Callable[[], Any], timings: dict[str, float]) -> Any:
        start = time.perf_counter()
        out = run()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings["model_seconds"] = time.perf_counter() - start
        return out

    def _score_volume(self, data: Mapping[str, Any], timings: dict[str, float]) -> ScoreResult:
        image: MetaTensor = data["image"]
        brain = data["mask"][0].numpy() > 0  # model grid (X, Y, Z)
        z = brain.shape[-1]
        area = brain.reshape(-1, z).sum(0)
        keep = np.flatnonzero(area >= max(self.min_brain_voxels, 1))
        if keep.size:
            res = self._timed_model(
                lambda: score_volume(
                    self.network,
                    image.as_subclass(torch.Tensor),
                    slices=keep,
                    batch_size=self.batch_size,
                    beta=self.beta,
                    map_kind=self.map_kind,
                    amp=self.amp,
                ),
                timings,
            )
            amap, rec = res.anomaly_map, res.reconstruction
            terms = {"score": res.slice_scores, "score_flow": res.score_flow, "score_recon": res.score_recon}
        else:
            timings["model_seconds"] = 0.0
            amap, rec, terms = np.zeros(brain.shape, np.float32), np.zeros(brain.shape, np.float32), {}
        per_slice = {
            k: terms[k] if terms.get(k) is not None else np.full(z, np.nan, np.float32)
            for k in ("score", "score_flow", "score_recon")
        }
        amap *= brain
        # back to the input grid: undo crop/pad, resampling and reorientation
        pipeline = self.pipeline("volume")
        inv = {
            "image": image,
            "anomaly_map": MetaTensor(torch.from_numpy(amap[None]), meta=dict(image.meta)),
            "brain": MetaTensor(torch.from_numpy(brain[None].astype(np.float32)), meta=dict(image.meta)),
        }
        inv["anomaly_map"].applied_operations = list(image.applied_operations)
        inv["brain"].applied_operations = list(image.applied_operations)
        with reraise_input_errors():
            back = Invertd(keys=("anomaly_map", "brain"), transform=pipeline, orig_keys="image", nearest_interp=False)(
                inv
            )
        map_in = np.ascontiguousarray(back["anomaly_map"][0].numpy().astype(np.float32))
        brain_in = back["brain"][0].numpy() > 0.5
        map_in[~brain_in] = 0.0
        affine = np.asarray(back["anomaly_map"].affine, dtype=np.float64)
        return self._finish(data, map_in, brain_in, affine, per_slice, keep, image, rec, amap)

    def _score_image(self, data: Mapping[str, Any], timings: dict[str, float]) -> ScoreResult:
        image: MetaTensor = data["image"]
        brain = data["mask"][0].numpy() > 0
        out = self._timed_model(
            lambda: score_slices(
                self.network,
                image.as_subclass(torch.Tensor)[None],
                self.batch_size,
                self.beta,
                self.map_kind,
                amp=self.amp,
            ),
            timings,
        )
        amap = out["anomaly_map"][0, 0].numpy() * brain
        shape = tuple(int(s) for s in image.meta.get("spatial_shape", image.shape[1:]))
        map_in = F.interpolate(torch.from_numpy(amap)[None, None], size=shape, mode="bilinear", align_corners=False)
        map_in = np.ascontiguousarray(map_in[0, 0].numpy().astype(np.float32))
        brain_in = (
            F.interpolate(torch.from_numpy(brain.astype(np.float32))[None, None], size=shape, mode="nearest")[0, 0]
            .numpy()
            .astype(bool)
        )
        per_slice = {k: out[k].numpy().astype(np.float32) for k in ("score", "score_flow", "score_recon") if k in out}
        rec = out["reconstruction"].mean(1)[0].numpy()
        return self._finish(
            data,
            map_in,
            brain_in,
            np.eye(4),
            per_slice,
            np.array([0]),
            image[..., None],
            rec[..., None],
            amap[..., None],
        )

    def _finish(
        self,
        data: Mapping[str, Any],
        map_in: np.ndarray,
        brain_in: np.ndarray,
        affine: np.ndarray,
        per_slice: Mapping[str, np.ndarray],
        keep: np.ndarray,
        image: torch.Tensor,
        rec: np.ndarray,
        amap: np.ndarray,
    ) -> ScoreResult:
        source = str(data["source"])
        lesion = None
        lesion_voxels = None
        if self.threshold is not None:
            processed = postprocess_map(map_in, brain_in, self.postprocess_config)
            lesion = segment(processed, self.threshold, self.postprocess_config).astype(np.uint8)
            lesion_voxels = int(lesion.sum())
        voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0 if data["kind"] == "volume" else None
        slice_scores = np.asarray(per_slice["score"])
        finite = slice_scores[np.isfinite(slice_scores)]
        scores: dict[str, Any] = {
            "input": source,
            "kind": data["kind"],
            "shape": list(map_in.shape),
            "volume_score": float(map_in[brain_in].mean()) if brain_in.any() else 0.0,
            "volume_score_method": VOLUME_SCORE_METHOD,
            "max_slice_score": float(finite.max()) if finite.size else None,
            "slice_scores": _finite_list(slice_scores),
            "slice_scores_flow": _finite_list(per_slice["score_flow"]) if "score_flow" in per_slice else None,
            "slice_scores_recon": _finite_list(per_slice["score_recon"]) if "score_recon" in per_slice else None,
            "slice_axis": "last axis of the RAS-oriented (and resampled, if configured) input",
            "scored_slices": int(len(keep)),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "postprocessing": self.postprocess_config.to_dict(),
            "lesion_voxels": lesion_voxels,
            "lesion_volume_ml": None if lesion_voxels is None or voxel_ml is None else lesion_voxels * voxel_ml,
            "brain_voxels": int(brain_in.sum()),
            "irregular_series": data.get("irregular_series"),
            "model": self.identity,
        }
        header = None
        if source.lower().endswith((".nii", ".nii.gz")):
            try:
                header = nib.load(source).header.copy()
            except Exception:  # the map is still written with the affine
                header = None
        preview = {
            "image": image.as_subclass(torch.Tensor)[0].numpy() if isinstance(image, torch.Tensor) else image,
            "reconstruction": rec,
            "anomaly_map": amap,
            "slice_scores": slice_scores,
        }
        return ScoreResult(
            source=source,
            name=output_name(source),
            kind=data["kind"],
            anomaly_map=map_in,
            lesion_mask=lesion,
            brain_mask=brain_in.astype(np.uint8),
            affine=affine,
            scores=scores,
            preview=preview,
            header=header,
        )


_PP_FIELDS = set(inspect.signature(PostprocessConfig).parameters)


def _save_nifti(array: np.ndarray, affine: np.ndarray, header: Any, path: Path, dtype: Any) -> None:
    img = nib.Nifti1Image(array.astype(dtype), affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    if dtype == np.float32:
        img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    atomic_write(path, lambda tmp: nib.save(img, tmp))


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


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand the command-line inputs: files, DICOM series folders, folders of them, and glob patterns.

    A folder that is not itself a DICOM series contributes its supported files and DICOM sub-folders (one
    level, sorted). A pattern with ``*``, ``?`` or ``[`` is expanded with :mod:`glob` (``**`` recursive).
    Paths that do not exist are kept, so that scoring reports them as failed inputs.

    Args:
        paths: what the user gave.

    Returns:
        The inputs, in order, without duplicates.

    Raises:
        AEFlowInputError: a pattern or folder that matches nothing.
    """
    out: list[Path] = []
    for raw in paths:
        text = os.fspath(raw)
        if any(c in text for c in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise AEFlowInputError("pattern matches no file", path=text)
            out += [Path(m) for m in matches]
            continue
        p = Path(text)
        if p.is_dir() and not is_dicom_series_dir(p):
            found = []
            for entry in sorted(p.iterdir()):
                if entry.is_dir() and is_dicom_series_dir(entry):
                    found.append(entry)
                elif entry.is_file() and _supported(entry):
                    found.append(entry)
            if not found:
                raise AEFlowInputError("folder holds no NIfTI, DICOM series, MetaImage, NRRD or 2D image", path=p)
            out += found
        else:
            out.append(p)
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _supported(path: Path) -> bool:
    try:
        return file_kind(path) in ("nifti", "itk", "image2d")
    except AEFlowInputError:
        return False


def score_paths(
    scorer: AnomalyScorer,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    preview: bool = True,
    masks: Mapping[str, str | os.PathLike] | None = None,
    workers: int = 1,
    progress: bool = True,
    lock: bool = True,
) -> list[dict[str, Any]]:
    """Score many inputs, loading the next ones in background threads while the model runs.

    A failing input (missing, corrupt, 4D, too large, irregular DICOM series, wrong channel count, existing
    outputs without ``overwrite``) is recorded and the others still complete. The output folder is locked for
    the whole call (:func:`lock_output_folder`), so that two runs cannot interleave their files; temporaries
    of an interrupted run are removed, and outputs it left incomplete (see :func:`output_state`) are redone
    without ``overwrite`` (the row's ``note`` says so).

    Args:
        scorer: the scorer.
        inputs: input files / DICOM folders (see :func:`expand_inputs`).
        out_dir: output folder.
        overwrite: replace existing outputs.
        preview: write PNG previews.
        masks: optional brain mask per input (keyed by the input path as given).
        workers: inputs loaded ahead in background threads (0: load in the main thread).
        progress: show a progress bar.
        lock: lock the output folder here; pass False when the caller already holds
            :func:`lock_output_folder` for ``out_dir``.

    Returns:
        One dict per input: ``input``, ``name``, ``status`` (``"ok"`` or ``"error"``), ``error``,
        ``volume_score``, ``max_slice_score``, ``lesion_voxels``, ``lesion_volume_ml``, ``seconds``,
        ``model_seconds``, ``outputs`` and, when incomplete outputs were replaced, ``note``.

    Raises:
        AEFlowInputError: two inputs share an output name, or the output folder is not writable or in use.
    """
    masks = dict(masks or {})
    names: dict[str, str] = {}
    for p in inputs:
        n = output_name(p)
        if n in names:
            raise AEFlowInputError(f"two inputs would write the same outputs '{n}' (also {names[n]})", path=p)
        names[n] = str(p)
    out_root = Path(out_dir)
    folder_lock = lock_output_folder(out_root) if lock else None
    try:
        return _score_locked(scorer, inputs, out_root, names, overwrite, preview, masks, workers, progress)
    finally:
        if folder_lock is not None:
            folder_lock.release()


def _score_locked(
    scorer: AnomalyScorer,
    inputs: Sequence[str | os.PathLike],
    out_root: Path,
    names: Mapping[str, str],
    overwrite: bool,
    preview: bool,
    masks: Mapping[str, str | os.PathLike],
    workers: int,
    progress: bool,
) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    remove_leftovers(out_root, names)
    incomplete: set[str] = set()

    def check_outputs(path: str | os.PathLike) -> None:
        kind = "image2d" if str(path).lower().endswith(IMAGE_2D_SUFFIXES) else "volume"
        state = output_state(output_name(path), out_root, kind)
        if state == "incomplete":
            incomplete.add(output_name(path))
        elif state == "complete" and not overwrite:
            dest = next(p for p in output_paths(output_name(path), out_root, kind).values() if p.exists())
            raise AEFlowInputError("output exists (use --overwrite to replace it)", path=dest)

    def load(path: str | os.PathLike) -> tuple[dict[str, Any] | None, BaseException | None, float]:
        start = time.perf_counter()
        try:
            check_outputs(path)
            return scorer.preprocess(path, masks.get(str(path))), None, time.perf_counter() - start
        except Exception as err:  # recorded per input; user errors are AEFlowInputError
            return None, err, time.perf_counter() - start

    rows: list[dict[str, Any]] = []
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    try:
        pending: list[Future] = []
        ahead = max(workers, 0) + 1
        queue = list(inputs)
        bar = tqdm(total=len(queue), desc="score", unit="input", disable=not progress)
        next_i = 0

        def submit() -> None:
            nonlocal next_i
            if pool is not None and next_i < len(queue):
                pending.append(pool.submit(load, queue[next_i]))
                next_i += 1

        for _ in range(ahead):
            submit()
        for i, path in enumerate(queue):
            if pool is not None:
                data, err, load_s = pending.pop(0).result()
                submit()
            else:
                data, err, load_s = load(path)
            row: dict[str, Any] = {"input": str(path), "name": output_name(path), "status": "error", "error": None}
            start = time.perf_counter()
            if err is None:
                try:
                    result = scorer.score_preprocessed(data)
                    written = write_outputs(result, out_root, overwrite=overwrite, preview=preview)
                    s = result.scores
                    row.update(
                        status="ok",
                        volume_score=s["volume_score"],
                        max_slice_score=s["max_slice_score"],
                        lesion_voxels=s["lesion_voxels"],
                        lesion_volume_ml=s["lesion_volume_ml"],
                        model_seconds=s["timing"]["model_seconds"],
                        outputs={k: str(v) for k, v in written.items()},
                    )
                    if row["name"] in incomplete:
                        row["note"] = "replaced the incomplete outputs of an interrupted run"
                except Exception as exc:  # one bad input must not stop the others
                    err = exc
            if err is not None:
                row["error"] = str(err) if isinstance(err, AEFlowInputError) else f"{type(err).__name__}: {err}"
                row["user_error"] = isinstance(err, AEFlowInputError)
            row["seconds"] = load_s + time.perf_counter() - start
            rows.append(row)
            bar.update(1)
            bar.set_postfix_str(f"{i + 1 - sum(r['status'] == 'ok' for r in rows)} failed")
        bar.close()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return rows
