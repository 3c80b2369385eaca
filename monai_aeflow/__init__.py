"""monai-aeflow: AE-FLOW anomaly detection for 2D and 3D medical images, as a MONAI module."""

from monai_aeflow.errors import AEFlowInputError, CheckpointError

__version__ = "0.1.0"

__all__ = ["AEFlowInputError", "CheckpointError", "__version__"]
