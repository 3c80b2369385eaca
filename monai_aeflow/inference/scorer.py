"""Scoring one input with a trained model file: :class:`AnomalyScorer` and its :class:`ScoreResult`.

:class:`AnomalyScorer` loads a model file (or a bundle folder), rebuilds the preprocessing stored in it,
runs the 2D model over every brain slice of a volume in batches (:func:`~monai_aeflow.inference.score_slices`)
and maps the anomaly map back through crop/pad, resampling and reorientation so that it overlays the input
voxel for voxel.

Before an input is loaded its header is checked against a voxel limit (a corrupt or hostile header cannot
drive a huge allocation) and a DICOM series is checked for unreadable slice files and non-uniform slice
spacing (MONAI's ITK reader would drop the slice and stack the rest at one spacing).
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Invertd

from monai_aeflow.checkpoint import load_model, stored_encoder_weights
from monai_aeflow.config_rules import check_value
from monai_aeflow.data.checks import DEFAULT_MAX_VOXELS, IrregularSeriesError, check_dicom_series, check_voxel_limit
from monai_aeflow.data.io import file_kind, reraise_input_errors
from monai_aeflow.device import resolve_amp_dtype, resolve_device
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.evaluation.postprocess import PostprocessConfig
from monai_aeflow.inference.model_file import BUNDLE_MODEL_FILES, preprocessing_from_config, resolve_model_path
from monai_aeflow.inference.outputs import _KINDS, _sha256, output_name
from monai_aeflow.inference.postprocess_torch import lesion_mask_on, lesion_mask_torch
from monai_aeflow.inference.result import VOLUME_SCORE_METHOD, ScoreResult, finite_list, map_sums
from monai_aeflow.inference.volume import FittingBatch, score_slices, score_volume_on, to_host
from monai_aeflow.visualize import most_anomalous_slices

__all__ = [
    "BUNDLE_MODEL_FILES",
    "VOLUME_SCORE_METHOD",
    "AnomalyScorer",
    "ScoreResult",
    "preprocessing_from_config",
    "resolve_model_path",
]

PREVIEW_SLICES = 4
"""Slices of the preview panel (the most anomalous); only these of the model-grid reconstruction and map are
copied back from the device."""


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
            :func:`~monai_aeflow.inference.default_batch_size`); halved when the device runs out of memory (see
            :class:`~monai_aeflow.inference.volume.FittingBatch`).
        threshold: binarisation threshold of the post-processed map (default: the model's, if any).
        amp: autocast on CUDA (default: on); see ``amp_dtype``.
        amp_dtype: autocast dtype, ``"bfloat16"`` (the CUDA default), ``"float16"`` or ``"none"``; None: the
            device's default (see :func:`~monai_aeflow.device.resolve_amp_dtype`). The flow's densities and
            log-determinants and the SSIM term are float32 whatever the autocast.
        postprocess_device: where the inverse transforms and the lesion mask's post-processing run: None for the
            scorer's device (scipy on the CPU, :mod:`~monai_aeflow.inference.postprocess_torch` elsewhere),
            ``"cpu"`` for both on the CPU, ``"torch-cpu"`` for the torch post-processing on the CPU.
        min_brain_voxels: axial slices with fewer brain voxels than this are not scored (map 0, score null).
        postprocessing: overrides of the stored post-processing (see
            :class:`~monai_aeflow.evaluation.postprocess.PostprocessConfig`).
        max_voxels: inputs whose header implies more voxels (times channels) are refused before loading
            (``None``: no limit).
        compile: ``torch.compile`` the network (True: the default mode; or a mode name such as
            ``"max-autotune"``); the first batch of each shape waits for the compilation.
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
        amp_dtype: str | None = None,
        postprocess_device: str | torch.device | None = None,
        compile: bool | str = False,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise AEFlowInputError(f"batch size must be at least 1, got {batch_size}")
        check_value("threshold", threshold, optional=True)  # nan or inf would give an empty mask
        if max_voxels is not None and max_voxels < 1:
            raise AEFlowInputError(f"the voxel limit must be at least 1, got {max_voxels}")
        self.max_voxels = None if max_voxels is None else int(max_voxels)
        self.accept_irregular_series = bool(accept_irregular_series)
        self.device = resolve_device(device)
        self.model_path = resolve_model_path(model)
        self.network, self.checkpoint = load_model(self.model_path, self.device)
        self.network = self.network.to(memory_format=torch.channels_last)  # faster convolutions on CPU and CUDA
        if compile:
            mode = "default" if compile is True else str(compile)
            self.network = torch.compile(self.network, mode=mode)
        config = self.checkpoint["config"]
        self.model_name = str(config.get("model_name", "aeflow"))
        self.preprocessing_config = dict(config.get("preprocessing") or {})
        score_cfg = dict(config.get("score") or {})
        self.beta = float(score_cfg.get("beta", 0.9))
        self.map_kind = str(score_cfg.get("map_kind", "residual"))
        self.in_channels = int(config["model"].get("in_channels", 1))
        self._batch = FittingBatch(None if batch_size is None else int(batch_size), self.device)
        self.amp = amp
        self.amp_dtype = resolve_amp_dtype(amp_dtype, self.device, amp)
        self.postprocess_device = str(postprocess_device or self.device)
        self._after = self.device if self.postprocess_device != "cpu" else torch.device("cpu")  # inverse transforms
        self.min_brain_voxels = int(min_brain_voxels)
        stored = self.checkpoint.get("threshold")
        self.threshold = float(threshold) if threshold is not None else (None if stored is None else float(stored))
        self.threshold_source = "given" if threshold is not None else ("model" if stored is not None else None)
        protocol = dict(self.checkpoint.get("threshold_protocol") or {})
        pp = {k: v for k, v in dict(protocol.get("postprocessing") or {}).items() if k in _PP_FIELDS}
        if protocol.get("postprocessing") and "normalize" not in pp:
            pp["normalize"] = "none"  # a threshold stored before the normalisation existed is on the raw map
        pp.update(postprocessing or {})
        self.postprocess_config = PostprocessConfig(**pp)
        self._pipelines = {kind: preprocessing_from_config(self.preprocessing_config, kind) for kind in _KINDS}
        self.identity = {
            "model_file": str(self.model_path.resolve()),
            "model_sha256": _sha256(self.model_path),
            "model_name": self.model_name,
            "network": dict(config["model"]),
            "encoder_weights": stored_encoder_weights(config),
            "preprocessing": self.preprocessing_config,
            "score": {"beta": self.beta, "map_kind": self.map_kind},
            "format": self.checkpoint.get("format"),
        }

    @property
    def batch_size(self) -> int | None:
        """Slices per forward pass (None: the device's default); halved when the device runs out of memory."""
        return self._batch.size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self._batch.size = value

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

    def score_preprocessed_many(self, datas: Sequence[Mapping[str, Any]]) -> list[ScoreResult]:
        """Score several data dicts returned by :meth:`preprocess`; 2D images of one size share forward passes.

        A folder of 2D images (chest X-rays) would otherwise run the network once per image, a batch of one.
        Volumes, and 2D images of another size than the first, are scored one by one. The network time of a
        shared pass is divided evenly between its images (``timing.model_seconds``). The results are those of
        :meth:`score_preprocessed` per input up to floating-point rounding (another batch size may take other
        kernels).

        Args:
            datas: preprocessed inputs.

        Returns:
            One :class:`ScoreResult` per input, in order.
        """
        images = [d for d in datas if d["kind"] == "image2d"]
        if len(images) < 2 or any(tuple(d["image"].shape) != tuple(images[0]["image"].shape) for d in images):
            return [self.score_preprocessed(d) for d in datas]
        shared: dict[str, float] = {}
        t0 = time.perf_counter()
        stack = torch.stack([d["image"].as_subclass(torch.Tensor) for d in images])
        out = self._timed_model(lambda: self._image_outputs(stack), shared)
        model_each = shared["model_seconds"] / len(images)
        post_each = (time.perf_counter() - t0 - shared["model_seconds"]) / len(images)  # stacking
        by_image = iter(range(len(images)))
        results = []
        for data in datas:
            if data["kind"] != "image2d":
                results.append(self.score_preprocessed(data))
                continue
            i = next(by_image)
            t1 = time.perf_counter()
            mine = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in out.items()}
            result = self._image_result(data, mine)
            post = post_each + time.perf_counter() - t1
            result.scores["timing"] = {"model_seconds": model_each, "postprocess_seconds": post}
            results.append(result)
        return results

    def _timed_model(self, run: Callable[[], Any], timings: dict[str, float]) -> Any:
        start = time.perf_counter()
        out = run()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        timings["model_seconds"] = time.perf_counter() - start
        return out

    def _score_volume(self, data: Mapping[str, Any], timings: dict[str, float]) -> ScoreResult:
        image: MetaTensor = data["image"]
        brain_np = data["mask"][0].numpy() > 0  # model grid (X, Y, Z)
        z = brain_np.shape[-1]
        area = brain_np.reshape(-1, z).sum(0)
        keep = np.flatnonzero(area >= max(self.min_brain_voxels, 1))
        # the map, its inverse transforms and the post-processing stay on the device (self._after); only the
        # final map and masks, the per-slice scores and the preview's slices come back to the host
        brain = torch.from_numpy(brain_np).to(self._after, non_blocking=True)
        if keep.size:
            res = self._timed_model(
                lambda: self._batch.run(
                    lambda batch: score_volume_on(
                        self.network,
                        image.as_subclass(torch.Tensor),
                        slices=keep,
                        batch_size=batch,
                        beta=self.beta,
                        map_kind=self.map_kind,
                        amp_dtype=self.amp_dtype or "none",
                        output_device=self._after,
                    ),
                    *image.shape[1:3],
                ),
                timings,
            )
            amap, rec = res.pop("anomaly_map"), res.pop("reconstruction")
            terms = {k: v.numpy() for k, v in res.items()}  # per-slice scores, on the host
        else:
            timings["model_seconds"] = 0.0
            amap = torch.zeros(brain.shape, dtype=torch.float32, device=self._after)
            rec, terms = amap, {}
        per_slice = {
            k: terms[k] if terms.get(k) is not None else np.full(z, np.nan, np.float32)
            for k in ("score", "score_flow", "score_recon")
        }
        amap = amap * brain
        # back to the input grid: undo crop/pad, resampling and reorientation
        pipeline = self.pipeline("volume")
        inv = {
            "image": image,
            "anomaly_map": MetaTensor(amap[None], meta=dict(image.meta)),
            "brain": MetaTensor(brain[None].float(), meta=dict(image.meta)),
        }
        inv["anomaly_map"].applied_operations = list(image.applied_operations)
        inv["brain"].applied_operations = list(image.applied_operations)
        with reraise_input_errors():
            back = Invertd(keys=("anomaly_map", "brain"), transform=pipeline, orig_keys="image", nearest_interp=False)(
                inv
            )
        map_in = back["anomaly_map"][0].as_subclass(torch.Tensor).float()
        brain_in = back["brain"][0].as_subclass(torch.Tensor) > 0.5
        map_in = torch.where(brain_in, map_in, torch.zeros((), dtype=map_in.dtype, device=map_in.device))
        affine = np.asarray(back["anomaly_map"].affine, dtype=np.float64)
        show = most_anomalous_slices(per_slice["score"], PREVIEW_SLICES) or [0]
        preview_rec, preview_map = np.zeros(brain_np.shape, np.float32), np.zeros(brain_np.shape, np.float32)
        rec_show, map_show = to_host(rec[..., show].float(), amap[..., show].float())
        preview_rec[..., show], preview_map[..., show] = rec_show, map_show
        return self._finish(data, map_in, brain_in, affine, per_slice, keep, image, preview_rec, preview_map)

    def _image_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network's outputs (:func:`score_slices`, on the host) for a ``(N, C, H, W)`` stack of images."""
        return self._batch.run(
            lambda batch: score_slices(
                self.network, images, batch, self.beta, self.map_kind, amp_dtype=self.amp_dtype or "none"
            ),
            *images.shape[-2:],
        )

    def _score_image(self, data: Mapping[str, Any], timings: dict[str, float]) -> ScoreResult:
        image: MetaTensor = data["image"]
        out = self._timed_model(lambda: self._image_outputs(image.as_subclass(torch.Tensor)[None]), timings)
        return self._image_result(data, out)

    def _image_result(self, data: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> ScoreResult:
        """One 2D image's result from its network outputs (a batch of one)."""
        image: MetaTensor = data["image"]
        brain = data["mask"][0].numpy() > 0
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
        map_in: np.ndarray | torch.Tensor,
        brain_in: np.ndarray | torch.Tensor,
        affine: np.ndarray,
        per_slice: Mapping[str, np.ndarray],
        keep: np.ndarray,
        image: torch.Tensor,
        rec: np.ndarray,
        amap: np.ndarray,
    ) -> ScoreResult:
        source = str(data["source"])
        lesion = sums = None
        if isinstance(map_in, torch.Tensor):  # on the device: post-process there, then one copy to the host
            if self.threshold is not None and self.postprocess_device not in ("cpu", "torch-cpu"):
                lesion = lesion_mask_torch(map_in, brain_in, self.threshold, self.postprocess_config)
            if map_in.device.type != "cpu" and (lesion is not None or self.threshold is None):  # same copy
                sums = map_sums(map_in, brain_in, lesion)
            map_in, brain_in, lesion, sums = to_host(map_in, brain_in, lesion, sums)
        if self.threshold is not None and lesion is None:
            lesion = lesion_mask_on(map_in, brain_in, self.threshold, self.postprocess_config, self.postprocess_device)
        if sums is None:
            sums = map_sums(map_in, brain_in, lesion)
        inside, brain_voxels = float(sums[0]), int(sums[1])
        lesion_voxels = None if lesion is None else int(sums[2])
        voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0 if data["kind"] == "volume" else None
        slice_scores = np.asarray(per_slice["score"])
        finite = slice_scores[np.isfinite(slice_scores)]
        scores: dict[str, Any] = {
            "input": source,
            "kind": data["kind"],
            "shape": list(map_in.shape),
            "volume_score": inside / brain_voxels if brain_voxels else 0.0,
            "volume_score_method": VOLUME_SCORE_METHOD,
            "max_slice_score": float(finite.max()) if finite.size else None,
            "slice_scores": finite_list(slice_scores),
            "slice_scores_flow": finite_list(per_slice["score_flow"]) if "score_flow" in per_slice else None,
            "slice_scores_recon": finite_list(per_slice["score_recon"]) if "score_recon" in per_slice else None,
            "slice_axis": "last axis of the RAS-oriented (and resampled, if configured) input",
            "scored_slices": int(len(keep)),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "postprocessing": self.postprocess_config.to_dict(),
            "lesion_voxels": lesion_voxels,
            "lesion_volume_ml": None if lesion_voxels is None or voxel_ml is None else lesion_voxels * voxel_ml,
            "brain_voxels": brain_voxels,
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
