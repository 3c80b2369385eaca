"""MONAI engines and the training workflow of AE-FLOW."""

from monai_aeflow.engines.handlers import (
    BestMetricState,
    ConfigState,
    ImageGridHandler,
    LearningRateLogger,
    ModelExportHandler,
    RandomState,
    ResumableCheckpointSaver,
    ValidationStatsHandler,
)
from monai_aeflow.engines.trainer import AEFlowEvaluator, AEFlowTrainer, slice_labels
from monai_aeflow.engines.workflow import (
    TrainingConfig,
    check_output_dir,
    checkpoint_epoch,
    clear_previous_run,
    create_engines,
    find_checkpoint,
    open_resume_checkpoint,
    previous_run_files,
    read_training_checkpoint,
    resolve_device,
    train,
)

__all__ = [
    "AEFlowEvaluator",
    "AEFlowTrainer",
    "BestMetricState",
    "ConfigState",
    "ImageGridHandler",
    "LearningRateLogger",
    "ModelExportHandler",
    "RandomState",
    "ResumableCheckpointSaver",
    "TrainingConfig",
    "ValidationStatsHandler",
    "check_output_dir",
    "checkpoint_epoch",
    "clear_previous_run",
    "create_engines",
    "find_checkpoint",
    "open_resume_checkpoint",
    "previous_run_files",
    "read_training_checkpoint",
    "resolve_device",
    "slice_labels",
    "train",
]
