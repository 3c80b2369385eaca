"""Inference: batched slice scoring of volumes and images with a trained model, on the input's grid."""

from monai_aeflow.inference.batch import expand_inputs, score_paths
from monai_aeflow.inference.model_file import preprocessing_from_config, resolve_model_path
from monai_aeflow.inference.outputs import output_name, output_paths, write_outputs, write_scores_summary
from monai_aeflow.inference.result import ScoreResult
from monai_aeflow.inference.scorer import AnomalyScorer
from monai_aeflow.inference.volume import (
    FittingBatch,
    VolumeResult,
    default_batch_size,
    pad_to_multiple,
    score_slices,
    score_volume,
    score_volume_on,
)

__all__ = [
    "AnomalyScorer",
    "FittingBatch",
    "ScoreResult",
    "VolumeResult",
    "default_batch_size",
    "expand_inputs",
    "output_name",
    "output_paths",
    "pad_to_multiple",
    "preprocessing_from_config",
    "resolve_model_path",
    "score_paths",
    "score_slices",
    "score_volume",
    "score_volume_on",
    "write_outputs",
    "write_scores_summary",
]
