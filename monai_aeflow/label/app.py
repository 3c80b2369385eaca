"""The MONAI Label app: AE-FLOW lesion mask and heat-map tasks over a folder of studies or a DICOMweb server.

``apps/aeflow_label/main.py`` exposes :class:`AEFlowLabelApp` to ``monailabel start_server``. Options come from
``--conf KEY VALUE`` (see :class:`LabelAppConfig`); ``model`` is required. On a DICOMweb datastore (``--studies
http://host/dicom-web``) the lesion mask and the anomaly map of each scored series go back to the server as DICOM
SEG and DICOM Parametric Map (:mod:`monai_aeflow.inference.dicom`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.utils.others.generic import remove_file

from monai_aeflow import __version__
from monai_aeflow.errors import AEFlowInputError, CheckpointError
from monai_aeflow.label.infer import DICOM_REQUEST_KEY, NO_THRESHOLD_MESSAGE, AEFlowInferTask
from monai_aeflow.label.levels import LEVEL_NAMES, AEFlowLevelsTask
from monai_aeflow.label.routes import (
    DICOM_SEG_REQUEST_KEY,
    InferQueue,
    install_infer_route,
    install_route_guards,
    make_infer_endpoint,
)
from monai_aeflow.label.validation import (
    SERVER_IMAGE_KEY,
    RequestError,
    ServerImage,
    is_safe_tag,
    resolve_brain_mask,
    resolve_image,
)

__all__ = ["ANOMALY_MAP_TAG", "AEFlowLabelApp", "LabelAppConfig"]

logger = logging.getLogger(__name__)

ANOMALY_MAP_TAG = "anomaly_map"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass
class LabelAppConfig:
    """Options of the app, given to ``monailabel start_server`` as ``--conf KEY VALUE``.

    Args:
        model: trained model file (``.pt``) or bundle folder (``models/model.pt``); required.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: slices per forward pass (default: 32 on CUDA, about 262k pixels per batch on CPU).
        threshold: binarisation threshold of the post-processed map (default: the model's).
        label: name of the returned label.
        name: name of the infer task, i.e. the ``<model>`` of ``POST /infer/<model>``.
        save_anomaly_map: store the float anomaly map of each datastore image as its label tag ``anomaly_map``.
        max_queue: inference requests waiting or running at once; more are answered 503 (try again later).
        levels: also serve the heat-map task ``<name>_levels`` (the anomaly map in three named levels).
        dicom_store: on a DICOMweb datastore, store the lesion mask (DICOM SEG) and the anomaly map (DICOM
            Parametric Map) of every scored series back on the server.
    """

    model: str
    device: str = "auto"
    batch_size: int | None = None
    threshold: float | None = None
    label: str = "anomaly"
    name: str = "aeflow"
    save_anomaly_map: bool = True
    max_queue: int = 16
    levels: bool = True
    dicom_store: bool = True

    @classmethod
    def from_conf(cls, conf: Mapping[str, str] | None) -> LabelAppConfig:
        """Parse the ``--conf`` strings of ``monailabel start_server``.

        Args:
            conf: key/value strings; unknown keys are ignored (MONAI Label passes its own too).

        Returns:
            The options.

        Raises:
            CheckpointError: no ``model`` given.
            AEFlowInputError: a value that does not parse.
        """
        conf = dict(conf or {})
        model = conf.get("model")
        if not model:
            raise CheckpointError(
                "no model given: start the server with --conf model PATH (a trained model .pt file or a bundle folder)"
            )
        kwargs: dict[str, Any] = {"model": str(model)}
        for key in ("device", "label", "name"):
            if conf.get(key):
                kwargs[key] = str(conf[key])
        try:
            if conf.get("batch_size"):
                kwargs["batch_size"] = int(conf["batch_size"])
            if conf.get("max_queue"):
                kwargs["max_queue"] = int(conf["max_queue"])
                if kwargs["max_queue"] < 1:
                    raise ValueError(f"max_queue must be at least 1, not {kwargs['max_queue']}")
            if conf.get("threshold") not in (None, "", "none", "None"):
                kwargs["threshold"] = float(conf["threshold"])
        except ValueError as err:
            raise AEFlowInputError(f"invalid --conf value: {err}") from err
        for key in ("save_anomaly_map", "levels", "dicom_store"):
            flag = str(conf.get(key, "true")).lower()
            if flag not in _TRUE + _FALSE:
                raise AEFlowInputError(f"invalid --conf {key} {flag!r} (expected true or false)")
            kwargs[key] = flag in _TRUE
        return cls(**kwargs)


class AEFlowLabelApp(MONAILabelApp):
    """MONAI Label app serving AE-FLOW anomaly detection as one segmentation model.

    ``POST /infer/aeflow?image=<id>`` returns the lesion mask as the label (``anomaly``) and, in the result
    JSON, the volume score, the per-slice scores and the threshold (see
    :class:`~monai_aeflow.label.AEFlowInferTask`). The float anomaly map is saved in the datastore as the label
    tag ``anomaly_map`` of the image, to be fetched with ``GET /datastore/label?label=<id>&tag=anomaly_map``;
    the result JSON names it under ``anomaly_map``.

    The model is loaded when the app starts: a missing model, a foreign checkpoint or a bad option stops the
    server with a one-line error naming the file.

    Args:
        app_dir: the app folder (given by ``monailabel start_server --app``).
        studies: the studies folder or DICOMweb address (``--studies``).
        conf: the ``--conf`` options (see :class:`LabelAppConfig`).

    Raises:
        CheckpointError: missing model option or file, foreign or unsafe checkpoint.
        AEFlowInputError: an invalid option.
    """

    def __init__(self, app_dir: str, studies: str, conf: Mapping[str, str] | None) -> None:
        try:
            self.app_config = LabelAppConfig.from_conf(conf)
            cfg = self.app_config
            lock = threading.Lock()
            self.infer_task = AEFlowInferTask(
                cfg.model,
                label_name=cfg.label,
                device=cfg.device,
                batch_size=cfg.batch_size,
                threshold=cfg.threshold,
                lock=lock,
            )
            self.levels_task = (
                AEFlowLevelsTask(cfg.model, scorer=self.infer_task.scorer, lock=lock) if cfg.levels else None
            )
        except AEFlowInputError as err:
            hint = " (--conf model PATH: a trained .pt file or a bundle folder)"
            hint = hint if isinstance(err, CheckpointError) else ""
            text = str(err).replace("--device", "--conf device").replace("--batch-size", "--conf batch_size")
            logger.error(f"AE-FLOW app cannot start: {text}{hint}")
            if "monailabel.app" in sys.modules:  # in monailabel start_server: this line, not a server traceback
                logging.shutdown()
                os._exit(2)
            raise
        self.queue = InferQueue(self.app_config.max_queue)
        scorer = self.infer_task.scorer
        logger.info(
            f"AE-FLOW model {scorer.model_path} ({scorer.model_name}) on {scorer.device}, threshold "
            f"{scorer.threshold} ({scorer.threshold_source or 'none'})"
        )
        if scorer.threshold is None:
            logger.warning(f"AE-FLOW app: {self.infer_task.scorer.model_path}: no threshold, labels will be empty")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=dict(conf or {}),
            name="monai-aeflow",
            description="AE-FLOW unsupervised anomaly detection: lesion mask, anomaly map and scores",
            version=__version__,
            labels=[self.app_config.label, *(LEVEL_NAMES if self.levels_task is not None else ())],
        )

    @property
    def levels_name(self) -> str:
        """Name of the heat-map task: ``<name>_levels``."""
        return f"{self.app_config.name}_levels"

    def served_models(self) -> list[str]:
        """The names of the infer tasks: ``POST /infer/<name>`` accepts these."""
        return [self.app_config.name] + ([self.levels_name] if self.levels_task is not None else [])

    def init_infers(self) -> dict[str, InferTask]:
        """The lesion-mask task ``conf["name"]`` (default ``aeflow``) and the heat-map task ``<name>_levels``."""
        infers: dict[str, InferTask] = {self.app_config.name: self.infer_task}
        if self.levels_task is not None:
            infers[self.levels_name] = self.levels_task
        return infers

    def _download_dcmqi_tools(self) -> None:
        """Nothing to download: the app writes DICOM SEG with highdicom, not MONAI Label's dcmqi tools.

        MONAI Label 0.8.5 fetches dcmqi from GitHub when it opens a DICOMweb datastore, which fails offline.
        """

    def init_trainers(self) -> dict[str, Any]:
        """No training through MONAI Label: AE-FLOW trains on healthy scans with ``aeflow-cli`` or the bundle."""
        return {}

    def on_init_complete(self) -> None:
        """Replace MONAI Label's ``POST /infer/<model>`` route by the app's own and guard its datastore, model and
        batch routes (see :mod:`monai_aeflow.label.routes`).

        Runs when the server has started (``monailabel start_server``); outside a server there is no route.
        """
        super().on_init_complete()
        server = sys.modules.get("monailabel.app")
        if server is not None and hasattr(server, "app"):
            install_route_guards(server.app)
            install_infer_route(server.app, make_infer_endpoint(self, self.queue))

    def info(self) -> dict[str, Any]:
        """MONAI Label's ``/info/`` plus ``aeflow_queue``: requests waiting or running, and the most allowed."""
        info = super().info()
        info["aeflow_queue"] = self.queue.info()
        return info

    def infer_wsi(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Not served: AE-FLOW scores volumes and 2D images through ``POST /infer/<model>``.

        Raises:
            HTTPException: 400 always.
        """
        raise HTTPException(status_code=400, detail="the AE-FLOW app has no whole-slide inference: POST /infer/<model>")

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Score a datastore image (or the server's own upload / session file), store its anomaly map as a label tag.

        The client's ``image`` is only ever looked up as a datastore id (a path, or an id the datastore does not
        hold, gets the same 404); ``brain_mask`` is a label tag of that image in the datastore. Only the app's own
        endpoint can hand over a server-side file, as a :class:`~monai_aeflow.label.validation.ServerImage`.

        Args:
            request: ``{"model", "image", ...}`` as built by ``POST /infer/<model>`` (or MONAI Label's batch
                inference).
            datastore: the datastore (default: the app's).

        Returns:
            MONAI Label's ``{"label", "tag", "file", "params"}``; ``params["anomaly_map"]`` is
            ``{"tag", "label_id", "url"}`` when the map was stored, else None (uploaded image, or
            ``save_anomaly_map`` off).

        Raises:
            HTTPException: 404 for an unknown image, 400 for a bad option or an input the model cannot score
                (the message names the problem).
        """
        store = datastore if datastore else self.datastore()
        try:
            if not isinstance(request, Mapping):
                raise RequestError(400, "the request must be a JSON object")
            request = dict(request)
            request.pop(DICOM_REQUEST_KEY, None)
            dicom_seg_out = request.pop(DICOM_SEG_REQUEST_KEY, None) is True
            server_image = request.pop(SERVER_IMAGE_KEY, None)
            mask_tag = request.pop("brain_mask", None)
            image_id = None
            if isinstance(server_image, ServerImage):
                if mask_tag is not None:
                    raise RequestError(400, "brain_mask is a label tag of a datastore image: not for an uploaded file")
                request["image"] = server_image.path
            else:
                image_id = request.get("image")
                request["image"] = _series_folder(store, image_id, resolve_image(store, image_id))
                if mask_tag is not None:
                    request["brain_mask"] = resolve_brain_mask(store, image_id, mask_tag)
            save_label = bool(request.pop("save_label", False)) and image_id is not None
            label_tag = request.pop("label_tag", DefaultLabelTag.ORIGINAL.value)
            if not is_safe_tag(label_tag):
                raise RequestError(400, "label_tag must be a datastore label tag (letters, digits, '_', '.', '-')")
            to_store = (
                self.app_config.dicom_store
                and _is_dicomweb(store)
                and image_id is not None
                and request.get("model") == self.app_config.name
                and os.path.isdir(request["image"])
            )
            if dicom_seg_out and not os.path.isdir(request["image"]):
                raise RequestError(400, "output=dicom_seg needs a DICOM series image (a DICOMweb datastore)")
            if dicom_seg_out or to_store:
                request[DICOM_REQUEST_KEY] = True if to_store else "seg"
            result = super().infer(request, store)
        except RequestError as err:
            raise HTTPException(status_code=err.status, detail=err.message) from None
        except AEFlowInputError as err:
            shown = "the uploaded image" if isinstance(server_image, ServerImage) else f"image {image_id!r}"
            raise HTTPException(status_code=400, detail=_for_client(err, shown, request.get("image"))) from err
        params = result.get("params") or {}
        params["input"] = "uploaded image" if isinstance(server_image, ServerImage) else image_id
        if isinstance(params.get("model"), Mapping):  # the model's identity without the server's folders
            params["model"] = {**params["model"], "model_file": Path(str(params["model"].get("model_file"))).name}
        map_file = params.pop("anomaly_map_file", None)
        params["anomaly_map"] = None
        dicom_files = {k: params.pop(f"dicom_{k}_file", None) for k in ("seg", "pmap")}
        try:
            if to_store:
                params["dicom"] = _store_dicom(store, dicom_files)
            if dicom_seg_out:
                if not dicom_files["seg"]:
                    raise HTTPException(status_code=400, detail=f"no DICOM SEG: {NO_THRESHOLD_MESSAGE}")
                result["dicom_seg"] = dicom_files.pop("seg")  # the endpoint sends it, then removes it
        except BaseException:
            for path in (map_file, result.get("file")):
                if path and os.path.exists(path):
                    remove_file(path)
            raise
        finally:
            for path in dicom_files.values():
                if path:
                    remove_file(path)
        if save_label and result.get("file") and os.path.exists(result["file"]):
            info = {"model": self.app_config.name, "params": params}
            result["label"] = store.save_label(image_id, result["file"], label_tag, info)
            result["tag"] = label_tag
        if not map_file or not os.path.exists(map_file):
            return result
        try:
            if (
                self.app_config.save_anomaly_map
                and image_id is not None
                and request.get("model") == self.app_config.name
            ):
                label_id = store.save_label(
                    image_id,
                    map_file,
                    ANOMALY_MAP_TAG,
                    {"model": self.app_config.name, "kind": "float32 anomaly map", "source": "monai-aeflow"},
                )
                params["anomaly_map"] = {
                    "tag": ANOMALY_MAP_TAG,
                    "label_id": label_id,
                    "url": f"/datastore/label?label={label_id}&tag={ANOMALY_MAP_TAG}",
                }
        finally:
            remove_file(map_file)
        return result


# command-line hints of the scorer's messages, which a client of the server cannot follow
_CLI_HINTS = (
    (" (a corrupt header? raise the limit with --max-voxels)", " (a corrupt header? the server's limit)"),
    (" (use --accept-irregular-series to score it as loaded)", ""),
)


def _for_client(err: AEFlowInputError, shown: str, *paths: Any) -> str:
    """The message of a refused input for the client: server paths replaced by what the client named."""
    text = str(err)
    for path in sorted({str(p) for p in (err.path, *paths) if p}, key=len, reverse=True):
        text = text.replace(path, shown)
    for hint, replacement in _CLI_HINTS:
        text = text.replace(hint, replacement)
    return text


def _is_dicomweb(store: Any) -> bool:
    from monailabel.datastore.dicom import DICOMWebDatastore

    return isinstance(store, DICOMWebDatastore)


def _series_folder(store: Any, image_id: str, uri: str) -> str:
    """The DICOM series folder of a DICOMweb datastore image, also when MONAI Label converted it to NIfTI.

    MONAI Label's DICOMweb datastore (0.8.5) downloads series ``<id>`` to the folder ``<id>`` of its cache's image
    folder and, unless ``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI=false``, returns a NIfTI converted from it; the app
    scores the series itself, so that its outputs lie on the series' own slices and can reference them.
    """
    if _is_dicomweb(store) and os.path.isfile(uri):
        folder = Path(store._datastore.image_path()) / image_id  # where get_image_uri downloaded the series
        if folder.is_dir() and any(folder.iterdir()):
            return str(folder)
    return uri


def _store_dicom(store: Any, files: Mapping[str, str | None]) -> dict[str, Any]:
    """STOW-RS the DICOM SEG and Parametric Map to the datastore's DICOMweb server; returns their UIDs."""
    import pydicom

    client = store._client  # MONAI Label's configured DICOMweb client (address, prefixes, authentication)
    stored: dict[str, Any] = {}
    for key, path in files.items():
        if not path:
            continue
        ds = pydicom.dcmread(path)
        try:
            client.store_instances([ds])
        except Exception as err:  # the PACS refused or is unreachable: say so, without a traceback
            logger.error(f"could not store the {key} on {client.base_url}: {err}")
            raise HTTPException(
                status_code=502, detail=f"the DICOMweb server did not store the DICOM {key}: {type(err).__name__}"
            ) from None
        stored[key] = {
            "StudyInstanceUID": str(ds.StudyInstanceUID),
            "SeriesInstanceUID": str(ds.SeriesInstanceUID),
            "SOPInstanceUID": str(ds.SOPInstanceUID),
            "Modality": str(ds.Modality),
        }
        logger.info(f"stored the {key} {ds.SeriesInstanceUID} in {client.base_url}")
    return stored
