"""MONAI Label infer task: AE-FLOW lesion mask as the label, scores in the result JSON, anomaly map as a file.

The task wraps :class:`~monai_aeflow.inference.AnomalyScorer`, so a request runs exactly what
``aeflow-cli score`` runs: the preprocessing stored in the model file, batched slice inference, the map brought
back to the input's grid, and the stored post-processing and threshold for the lesion mask.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monai_aeflow.inference import AnomalyScorer, ScoreResult, write_outputs

__all__ = ["AEFlowInferTask", "DICOM_REQUEST_KEY", "NO_THRESHOLD_MESSAGE"]

NO_THRESHOLD_MESSAGE = (
    "the model stores no threshold and none was configured: the label is empty; set one with "
    "'aeflow-cli evaluate --checkpoint MODEL' or the app option '--conf threshold VALUE'"
)

_RESULT_KEY = "aeflow_result"
DICOM_REQUEST_KEY = "aeflow_dicom"
"""Request key (set by the app, never taken from a client's ``params``) asking for the DICOM outputs of a series."""


def _move_to_temp(src: Path, prefix: str) -> str:
    """Move ``src`` to a new file in the system temporary folder (same suffix) and return its path."""
    suffix = "".join(src.suffixes[-2:]) if src.name.endswith(".nii.gz") else src.suffix
    fd, dest = tempfile.mkstemp(prefix=prefix, suffix=suffix)
    os.close(fd)
    shutil.move(str(src), dest)
    return dest


class AEFlowInferTask(BasicInferTask):
    """Unsupervised anomaly detection with a trained AE-FLOW model, as a MONAI Label segmentation task.

    A request ``{"image": path}`` (MONAI Label fills in the path of a datastore image) returns:

    - the label file: the post-processed binary lesion mask (``uint8``, value 1 for the label ``label_name``) as
      NIfTI with the input's shape, affine and header (an empty mask when no threshold is known);
    - the result JSON: everything ``aeflow-cli score`` writes to ``*_scores.json`` (``volume_score``,
      ``slice_scores``, ``threshold``, ``lesion_voxels``, model identity, timing, ...), plus
      ``anomaly_map_file``: a float32 NIfTI of the anomaly map on the input's grid, written to the system
      temporary folder. MONAI Label has no channel for a second image; :class:`~monai_aeflow.label.AEFlowLabelApp`
      moves this file into the datastore as the label tag ``anomaly_map``. When the task is called directly
      the caller owns (and removes) both files.

    Concurrent requests share one model; scoring is serialised by a lock (on a CPU the slice batches already use
    every core; on a GPU it keeps the memory of one volume at a time).

    Args:
        model: a trained model file (``.pt``) or a bundle folder holding ``models/model.pt``.
        label_name: name of the returned label.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        batch_size: slices per forward pass (default: 32 on CUDA, about 262k pixels per batch on CPU).
        threshold: binarisation threshold of the post-processed map (default: the one stored in the model).
        description: shown by MONAI Label clients.
        scorer: an already loaded scorer to share (then ``model``, ``device``, ``batch_size`` and ``threshold`` are
            ignored).
        lock: the lock that serialises scoring (share it with the tasks that share the scorer).
        dicom: for a DICOM series input, also write the lesion mask as DICOM SEG and the anomaly map as a DICOM
            Parametric Map (:mod:`monai_aeflow.inference.dicom`); the result JSON names them under
            ``dicom_seg_file`` and ``dicom_pmap_file`` (the caller owns and removes them). A request can ask for
            them too (key :data:`DICOM_REQUEST_KEY`, set by the app: True for both, ``"seg"`` for the SEG alone).

    Raises:
        CheckpointError: missing model file, foreign or unsafe checkpoint (one line naming the file).

    Example::

        task = AEFlowInferTask("runs/brats/model.pt", device="cpu")
        label_file, result = task({"image": "BraTS2021_00000_flair.nii.gz"})
        print(result["volume_score"], result["threshold"], result["anomaly_map_file"])
    """

    def __init__(
        self,
        model: str | os.PathLike,
        label_name: str = "anomaly",
        device: str = "auto",
        batch_size: int | None = None,
        threshold: float | None = None,
        description: str | None = None,
        scorer: AnomalyScorer | None = None,
        lock: threading.Lock | None = None,
        dicom: bool = False,
    ) -> None:
        if scorer is None:
            scorer = AnomalyScorer(model, device=device, batch_size=batch_size, threshold=threshold)
        self.scorer = scorer
        self.label_name = label_name
        self.dicom = bool(dicom)
        self._lock = lock if lock is not None else threading.Lock()
        super().__init__(
            path=str(self.scorer.model_path),
            network=None,
            type=InferType.SEGMENTATION,
            labels={label_name: 1},
            dimension=3,
            description=description
            or "AE-FLOW unsupervised anomaly detection: lesion mask, anomaly map and volume / slice scores",
        )
        # the scorer's device is fixed when the model is loaded; show it instead of every device of the machine
        self._config = {"device": [str(self.scorer.device)]}

    def info(self) -> dict[str, Any]:
        """Task description for ``/info/``: MONAI Label's fields plus the model file's name and the threshold."""
        info = super().info()
        info.update(
            {
                "model_file": self.scorer.model_path.name,  # not the server's folders
                "model_name": self.scorer.model_name,
                "threshold": self.scorer.threshold,
                "threshold_source": self.scorer.threshold_source,
                "anomaly_map": "float32 NIfTI on the input's grid, in the datastore under the label tag anomaly_map",
            }
        )
        return info

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        """None: the scorer loads the input and applies the preprocessing stored in the model file."""
        return []

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        """None: the scorer maps the result back to the input's grid and post-processes the lesion mask."""
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        """Score the request's image with the model (``device`` and batching are the scorer's).

        Args:
            data: the request; ``data["image"]`` is the path of a volume (NIfTI, NRRD, MetaImage) or a DICOM
                series folder; an optional ``data["brain_mask"]`` is a brain-mask file on the same grid.
            convert_to_batch: unused (the scorer batches slices itself).
            device: unused (the scorer's device is fixed when the model is loaded).

        Returns:
            ``data`` with the :class:`~monai_aeflow.inference.ScoreResult` under ``"aeflow_result"`` and the
            lesion mask under the output label key.

        Raises:
            MONAILabelException: the image is not a path.
            AEFlowInputError: unreadable input, wrong channel count, ... (message names the file).
        """
        image = data.get(self.input_key)
        if not isinstance(image, str | os.PathLike):
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "AE-FLOW infer expects the path of an image")
        with self._lock:
            result = self.scorer.score(image, mask=data.get("brain_mask"))
        if result.lesion_mask is None:
            result = dataclasses.replace(result, lesion_mask=np.zeros(result.anomaly_map.shape, np.uint8))
            result.scores["message"] = NO_THRESHOLD_MESSAGE
        data[_RESULT_KEY] = result
        data[self.output_label_key] = result.lesion_mask
        return data

    def writer(
        self, data: dict[str, Any], extension: str | None = None, dtype: Any = None
    ) -> tuple[str | None, dict[str, Any]]:
        """Write the lesion mask and the anomaly map with the input's shape, affine and header.

        The files are written by :func:`~monai_aeflow.inference.write_outputs` (the writer of
        ``aeflow-cli score``) and moved to unique names in the system temporary folder.

        Args:
            data: the data returned by :meth:`run_inferer`.
            extension: unused (volumes give NIfTI, 2D images PNG / TIFF, as ``aeflow-cli score``).
            dtype: unused (the mask is ``uint8``, the map ``float32``).

        Returns:
            The label file and the result JSON (scores, ``anomaly_map_file``).
        """
        result: ScoreResult = data[_RESULT_KEY]
        with tempfile.TemporaryDirectory(prefix="aeflow_label_") as tmp:
            written = write_outputs(result, tmp, overwrite=True, preview=False, name="aeflow")
            label_file = _move_to_temp(Path(written["mask"]), "aeflow_mask_")
            map_file = _move_to_temp(Path(written["anomaly"]), "aeflow_anomaly_")
        params = dict(result.scores)
        params["label_name"] = self.label_name
        params["anomaly_map_file"] = map_file
        asked = data.get(DICOM_REQUEST_KEY)
        kinds = ("seg", "pmap") if self.dicom or asked is True else ("seg",) if asked == "seg" else ()
        if kinds and result.kind == "volume" and os.path.isdir(result.source):
            params.update(_write_dicom(result, self.label_name, kinds))
        return label_file, params


def _write_dicom(result: ScoreResult, label: str, kinds: Sequence[str]) -> dict[str, str]:
    """DICOM SEG and Parametric Map of a scored DICOM series, in the system temporary folder."""
    from monai_aeflow.inference.dicom import dicom_outputs

    files = {}
    try:
        for key, ds in dicom_outputs(result, label=label, kinds=kinds).items():
            fd, path = tempfile.mkstemp(prefix=f"aeflow_{key}_", suffix=".dcm")
            os.close(fd)
            files[f"dicom_{key}_file"] = path
            ds.save_as(path)
    except BaseException:
        for path in files.values():
            os.unlink(path)
        raise
    return files
