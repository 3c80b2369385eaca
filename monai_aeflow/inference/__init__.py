"""Inference: batched slice scoring of volumes and images with a trained AE-FLOW model."""

from monai_aeflow.inference.volume import VolumeResult, pad_to_multiple, score_slices, score_volume

__all__ = ["VolumeResult", "pad_to_multiple", "score_slices", "score_volume"]
