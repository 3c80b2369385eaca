"""MONAI engines and the training workflow of every registered model (AE-FLOW and the baselines).

:mod:`.trainer` holds the engines, :mod:`.handlers` the ignite handlers, :mod:`.workflow` the training loop
(:func:`train`), :mod:`.run_folder` the run folder's files (model file, checkpoints, output checks) and
:mod:`.run` the training of one model on prepared data (what ``aeflow-cli train`` runs).
"""

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
from monai_aeflow.engines.run import parse_assignments, run_training, train_model
from monai_aeflow.engines.trainer import AEFlowEvaluator, AEFlowTrainer, AnomalyEvaluator, AnomalyTrainer, slice_labels
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
    "AnomalyEvaluator",
    "AnomalyTrainer",
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
    "parse_assignments",
    "previous_run_files",
    "read_training_checkpoint",
    "resolve_device",
    "run_training",
    "slice_labels",
    "train",
    "train_model",
]
