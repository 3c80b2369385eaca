"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """The folder of real scans beside the repository; skips the test when it is absent."""
    root = Path(os.environ.get("AEFLOW_SHARED_DATA", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"real data folder {root} not present")
    return root


def train_small_volume_model(out_dir: Path, epochs: int = 8, shape=(64, 64, 48)) -> dict:
    """Train a small AE-FLOW (ResNet-18 layer3, random weights) on healthy synthetic volumes, through the same
    volume preprocessing that scoring rebuilds from the model file, and store a threshold in it.

    Returns:
        ``{"model": model.pt path, "cohort": the generated records (2 healthy training subjects are excluded),
        "lesioned": records of lesioned subjects, "healthy": unseen healthy records}``.
    """
    from monai.data import DataLoader, Dataset

    from monai_aeflow.checkpoint import read_checkpoint
    from monai_aeflow.data.slices import SliceDataset
    from monai_aeflow.data.synthetic import generate_cohort
    from monai_aeflow.data.transforms import build_volume_preprocessing
    from monai_aeflow.engines import TrainingConfig, train
    from monai_aeflow.evaluation.checkpoint import save_threshold
    from monai_aeflow.networks import AEFlow

    cohort = generate_cohort(out_dir / "data", 7, 2, seed=11, shape=shape, spacing=(3.0, 3.0, 3.0))
    healthy = [c for c in cohort if c["healthy"]]
    lesioned = [c for c in cohort if not c["healthy"]]
    preprocessing = {"spatial_size": list(shape[:2]), "percentiles": [1.0, 99.0], "orientation": "RAS"}
    preprocess = build_volume_preprocessing(spatial_size=shape[:2])
    volumes = [
        {
            **preprocess({"image": r["image"], "mask": r["brain_mask"], "label": r["label"]}),
            "subject_id": r["subject_id"],
            "modality": "flair",
        }
        for r in healthy[:6]
    ]
    items = list(SliceDataset(volumes, min_area_fraction=0.2, healthy_only=True))
    torch.manual_seed(0)
    loader = DataLoader(Dataset(items), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = TrainingConfig(
        output_dir=str(out_dir / "model"),
        max_epochs=epochs,
        lr=1e-3,
        progress=False,
        seed=0,
        device="cpu",
        preprocessing=preprocessing,
    )
    summary = train(AEFlow(backbone="resnet18", backbone_weights=None), loader, None, cfg)
    model = Path(summary["model_path"])
    # threshold: the 99.5th percentile of the post-processed map over brain voxels of an unseen healthy subject
    import nibabel as nib
    import numpy as np

    from monai_aeflow.evaluation.postprocess import PostprocessConfig, postprocess_map
    from monai_aeflow.inference import AnomalyScorer

    pp = PostprocessConfig(residual="positive")
    result = AnomalyScorer(model, device="cpu").score(healthy[6]["image"])
    brain = nib.load(healthy[6]["brain_mask"]).get_fdata() > 0
    threshold = float(np.percentile(postprocess_map(result.anomaly_map, brain, pp)[brain], 99.5))
    save_threshold(
        model, threshold, {"method": "99.5th percentile on a healthy subject", "postprocessing": pp.to_dict()}
    )
    assert read_checkpoint(model)["threshold"] == threshold
    return {"model": model, "cohort": cohort, "lesioned": lesioned, "healthy": healthy[6:], "threshold": threshold}


@pytest.fixture(scope="session")
def small_volume_model(tmp_path_factory) -> dict:
    """A small AE-FLOW trained once per test session on synthetic volumes (see :func:`train_small_volume_model`)."""
    return train_small_volume_model(tmp_path_factory.mktemp("small_volume_model"))
