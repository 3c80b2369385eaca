"""File-level anomaly scoring: a trained model file in, anomaly maps on the input's grid out.

:class:`AnomalyScorer` loads a model file (or a bundle folder), rebuilds the preprocessing stored in it,
runs the 2D model over every brain slice of a volume in batches (:func:`~monai_aeflow.inference.score_slices`)
and maps the anomaly map back through crop/pad, resampling and reorientation so that it overlays the input
voxel for voxel. :func:`write_outputs` writes the NIfTI map, the binary lesion mask, the JSON of scores and a
PNG preview as one group (the JSON last, as the commit marker); :func:`score_paths` does all of it for many
inputs, overlapping loading with the model, while holding a lock on the output folder.

Before an input is loaded its header is checked against a voxel limit (a corrupt or hostile header cannot
drive a huge allocation) and a DICOM series is checked for unreadable slice files and non-uniform slice
spacing (MONAI's ITK reader would drop the slice and stack the rest at one spacing).

Example::

    scorer = AnomalyScorer("runs/brats/model.pt", device="cuda")
    result = scorer.score("BraTS2021_00000_flair.nii.gz")
    write_outputs(result, "out/")   # out/BraTS2021_00000_flair_anomaly.nii.gz, _mask.nii.gz, _scores.json, .png

The code lives in :mod:`monai_aeflow.inference.scorer` (:class:`AnomalyScorer`),
:mod:`monai_aeflow.inference.result` (:class:`ScoreResult`), :mod:`monai_aeflow.inference.model_file`,
:mod:`monai_aeflow.inference.outputs` (output names, writers, state and lock) and
:mod:`monai_aeflow.inference.batch` (:func:`expand_inputs`, :func:`score_paths`); this module re-exports them.
"""

from monai_aeflow.inference.batch import expand_inputs, score_paths
from monai_aeflow.inference.outputs import (
    SCORE_LOCK_NAME,
    lock_output_folder,
    output_name,
    output_paths,
    output_state,
    remove_leftovers,
    write_outputs,
)
from monai_aeflow.inference.scorer import (
    BUNDLE_MODEL_FILES,  # noqa: F401  (module constants kept reachable here)
    VOLUME_SCORE_METHOD,  # noqa: F401
    AnomalyScorer,
    ScoreResult,
    preprocessing_from_config,
    resolve_model_path,
)

__all__ = [
    "AnomalyScorer",
    "ScoreResult",
    "SCORE_LOCK_NAME",
    "expand_inputs",
    "lock_output_folder",
    "output_name",
    "output_paths",
    "output_state",
    "preprocessing_from_config",
    "remove_leftovers",
    "resolve_model_path",
    "score_paths",
    "write_outputs",
]
