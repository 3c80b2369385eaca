"""MONAI Label integration: infer tasks and an app that return the AE-FLOW lesion mask, heat map and scores.

Needs the MONAI Label server (``monailabel`` 0.8.5), installed as described in the README (section MONAI Label)::

    pip install --no-deps monailabel==0.8.5 pydicom-seg==0.4.1 && pip install -r requirements-label.txt

The app folder ``apps/aeflow_label`` serves it::

    monailabel start_server --app apps/aeflow_label --studies /data/nifti --conf model runs/brats/model.pt \\
        --host 127.0.0.1
"""

from __future__ import annotations

try:
    import monailabel  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "monai_aeflow.label needs MONAI Label: pip install --no-deps monailabel==0.8.5 pydicom-seg==0.4.1 "
        "&& pip install -r requirements-label.txt (see the README, section MONAI Label)"
    ) from err

from monai_aeflow.label.app import ANOMALY_MAP_TAG, AEFlowLabelApp, LabelAppConfig
from monai_aeflow.label.infer import AEFlowInferTask
from monai_aeflow.label.levels import LEVEL_COLORS, LEVEL_NAMES, AEFlowLevelsTask

__all__ = [
    "ANOMALY_MAP_TAG",
    "AEFlowInferTask",
    "AEFlowLevelsTask",
    "AEFlowLabelApp",
    "LEVEL_COLORS",
    "LEVEL_NAMES",
    "LabelAppConfig",
]
