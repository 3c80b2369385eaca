"""MONAI engines and the training workflow of AE-FLOW."""

from monai_aeflow.engines.handlers import (
    ConfigState,
    ImageGridHandler,
    LearningRateLogger,
    ModelExportHandler,
    ValidationStatsHandler,
)
from monai_aeflow.engines.trainer import AEFlowEvaluator, AEFlowTrainer, slice_labels
from monai_aeflow.engines.workflow import TrainingConfig, create_engines, resolve_device, train

__all__ = [
    "AEFlowEvaluator",
    "AEFlowTrainer",
    "ConfigState",
    "ImageGridHandler",
    "LearningRateLogger",
    "ModelExportHandler",
    "TrainingConfig",
    "ValidationStatsHandler",
    "create_engines",
    "resolve_device",
    "slice_labels",
    "train",
]
