"""The end-to-end demo: synthetic cohort -> AE-FLOW training -> anomaly map of a lesioned volume on disk.

Used by ``aeflow-cli demo``; every step uses the package's own data, engine, inference and visualisation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset
from sklearn.metrics import roc_auc_score

from monai_aeflow.checkpoint import load_model
from monai_aeflow.data.datalists import split_cohort
from monai_aeflow.data.preprocessing import build_volume_preprocessing
from monai_aeflow.data.slices import SliceDataset, select_slices
from monai_aeflow.data.synthetic import generate_cohort
from monai_aeflow.engines.workflow import TrainingConfig, resolve_device, train
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import atomic_write, atomic_write_json
from monai_aeflow.inference.volume import score_volume
from monai_aeflow.models import build_model
from monai_aeflow.visualize import most_anomalous_slices, save_slice_panel

__all__ = ["DemoConfig", "run_demo"]

logger = logging.getLogger("monai_aeflow.demo")


@dataclass
class DemoConfig:
    """Settings of the demo (CPU-sized defaults: a few minutes on two cores).

    Args:
        output_dir: where data, model, maps, pictures and metrics go.
        n_train: healthy training subjects.
        n_val_healthy: healthy validation subjects.
        n_val_lesion: lesioned validation subjects.
        n_test: lesioned test subjects.
        n_test_healthy: healthy test subjects (their slices are the negatives of the slice-level AUROC).
        shape: volume shape (in-plane sizes must be multiples of 16).
        spacing: voxel size in mm.
        epochs: training epochs.
        batch_size: slices per batch.
        lr: Adam learning rate.
        backbone: ``"resnet18"`` (light) or ``"wide_resnet50_2"`` (paper).
        backbone_weights: ``"none"`` (random), ``"imagenet"`` (download), ``"auto"`` (ImageNet when it can be
            downloaded or is cached, random otherwise, with a warning) or a local state-dict path.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        min_brain_fraction: keep axial slices whose brain area is at least this fraction of the largest.
        seed: seed of data generation and training.
        progress: show progress bars.
    """

    output_dir: str = "aeflow_demo"
    n_train: int = 6
    n_val_healthy: int = 1
    n_val_lesion: int = 2
    n_test: int = 2
    n_test_healthy: int = 1
    shape: tuple[int, int, int] = (64, 64, 48)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    backbone: str = "resnet18"
    backbone_weights: str = "auto"
    device: str = "auto"
    min_brain_fraction: float = 0.3
    seed: int = 0
    progress: bool = True


def _slice_items(volumes: Sequence[dict], min_fraction: float, healthy_only: bool) -> list[dict]:
    return list(SliceDataset(volumes, min_area_fraction=min_fraction, healthy_only=healthy_only))


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate a synthetic cohort, train AE-FLOW on its healthy slices and score lesioned test volumes.

    Writes into ``cfg.output_dir``: ``data/`` (the cohort as NIfTI), ``model/`` (``model.pt``, resumable
    checkpoints, TensorBoard logs), ``results/<subject>_anomaly.nii.gz`` (same shape and affine as the
    input), ``results/<subject>_panel.png`` and ``results/metrics.json``.

    Args:
        cfg: the demo settings.
        say: where progress messages go.

    Returns:
        The metrics written to ``metrics.json``.
    """
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    data_dir, model_dir, res_dir = out / "data", out / "model", out / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    if any(s % 16 for s in cfg.shape[:2]):
        raise AEFlowInputError(f"in-plane shape {cfg.shape[:2]} must be multiples of 16")
    device = resolve_device(cfg.device)

    n_healthy = cfg.n_train + cfg.n_val_healthy + cfg.n_test_healthy
    n_lesion = cfg.n_val_lesion + cfg.n_test
    say(f"[1/4] generating {n_healthy} healthy and {n_lesion} lesioned synthetic subjects in {data_dir}")
    cohort = generate_cohort(
        data_dir, n_healthy, n_lesion, seed=cfg.seed, shape=cfg.shape, spacing=cfg.spacing, progress=cfg.progress
    )
    splits = split_cohort(cohort, cfg.n_train, cfg.n_val_healthy, cfg.n_val_lesion)
    preprocessing = {"spatial_size": list(cfg.shape[:2]), "percentiles": [1.0, 99.0], "orientation": "RAS"}
    preprocess = build_volume_preprocessing(spatial_size=cfg.shape[:2])

    def load(rec: dict) -> dict:
        d = preprocess({"image": rec["image"], "mask": rec["brain_mask"], "label": rec["label"]})
        d["subject_id"] = rec["subject_id"]
        d["modality"] = "flair"
        return d

    volumes = {name: [load(r) for r in recs] for name, recs in splits.items()}
    train_items = _slice_items(volumes["train"], cfg.min_brain_fraction, healthy_only=True)
    val_items = _slice_items(volumes["val"], cfg.min_brain_fraction, healthy_only=False)
    say(f"      {len(train_items)} healthy training slices, {len(val_items)} validation slices")

    say(f"[2/4] training AE-FLOW ({cfg.backbone}) for {cfg.epochs} epochs on {device}")
    torch.manual_seed(cfg.seed)
    net, info = build_model("aeflow", backbone=cfg.backbone, backbone_weights=cfg.backbone_weights, say=say)
    weights_used = info["backbone_weights"]
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(Dataset(train_items), batch_size=cfg.batch_size, shuffle=True, generator=gen)
    val_loader = DataLoader(Dataset(val_items), batch_size=cfg.batch_size * 2)
    tcfg = TrainingConfig(
        output_dir=str(model_dir),
        max_epochs=cfg.epochs,
        lr=cfg.lr,
        device=str(device),
        progress=cfg.progress,
        seed=cfg.seed,
        preprocessing=preprocessing,
    )
    summary = train(net, train_loader, val_loader, tcfg)
    say(
        f"      {summary['images_per_second']:.1f} slices/s, best validation slice AUROC "
        f"{summary['best_val_auroc']:.3f} (epoch {summary['best_epoch']})"
    )

    say("[3/4] scoring the lesioned test volumes")
    model, ckpt = load_model(summary["model_path"], device)
    beta = ckpt["config"]["score"]["beta"]
    slice_scores, slice_truth, slice_area, slice_healthy_subject, pix_scores, pix_truth = [], [], [], [], [], []
    outputs = []
    for rec, vol in zip(splits["test"], volumes["test"], strict=True):
        image = vol["image"].as_subclass(torch.Tensor)
        mask = vol["mask"][0].numpy() > 0
        truth = vol["label"][0].numpy() > 0
        keep = select_slices(mask, None, cfg.min_brain_fraction)
        result = score_volume(model, image, batch_size=cfg.batch_size * 2, beta=beta)
        slice_scores.append(result.slice_scores[keep])
        slice_truth.append(truth[..., keep].reshape(-1, len(keep)).any(0))
        slice_area.append(truth[..., keep].reshape(-1, len(keep)).sum(0))
        slice_healthy_subject.append(np.full(len(keep), bool(rec["healthy"])))
        if not rec["healthy"]:
            pix_scores.append(result.anomaly_map[mask])
            pix_truth.append(truth[mask])
        src = nib.load(rec["image"])
        if src.shape != result.anomaly_map.shape:
            raise RuntimeError(f"anomaly map shape {result.anomaly_map.shape} differs from the input {src.shape}")
        map_path = res_dir / f"{rec['subject_id']}_anomaly.nii.gz"
        img = nib.Nifti1Image(result.anomaly_map.astype(np.float32), src.affine)
        atomic_write(map_path, lambda tmp, img=img: nib.save(img, tmp))
        lesion_area = truth.reshape(-1, truth.shape[-1]).sum(0)
        if lesion_area.any():
            show = sorted(np.argsort(lesion_area)[::-1][:4].tolist())
        else:
            show = most_anomalous_slices(result.slice_scores, 4)
        panel = save_slice_panel(
            res_dir / f"{rec['subject_id']}_panel.png",
            image[0].numpy(),
            show,
            reconstruction=result.reconstruction,
            anomaly_map=result.anomaly_map,
            truth=truth.astype(np.float32),
            slice_scores=result.slice_scores,
            title=f"AE-FLOW on {rec['subject_id']} (synthetic)",
        )
        outputs.append({"subject_id": rec["subject_id"], "anomaly_map": str(map_path), "panel": str(panel)})

    st, ss = np.concatenate(slice_truth), np.concatenate(slice_scores)
    sa, sh = np.concatenate(slice_area), np.concatenate(slice_healthy_subject)
    clear = sh | (sa >= 30)  # healthy-subject slices against slices with >= 30 lesion pixels
    pt, ps = np.concatenate(pix_truth), np.concatenate(pix_scores)
    metrics = {
        "test_subjects": [o["subject_id"] for o in outputs],
        "test_slices": int(st.size),
        "test_lesioned_slices": int(st.sum()),
        "slice_auroc": float(roc_auc_score(st, ss)) if 0 < st.sum() < st.size else None,
        "slice_auroc_healthy_subjects_vs_lesion_ge30px": (
            float(roc_auc_score(st[clear], ss[clear])) if 0 < st[clear].sum() < clear.sum() else None
        ),
        "pixel_auroc_brain": float(roc_auc_score(pt, ps)) if 0 < pt.sum() < pt.size else None,
        "best_val_slice_auroc": summary.get("best_val_auroc"),
        "train_slices": len(train_items),
        "train_slices_per_second": summary["images_per_second"],
        "train_seconds": summary["seconds"],
        "backbone": cfg.backbone,
        "backbone_weights": weights_used,
        "device": str(device),
        "wall_seconds": time.perf_counter() - t0,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "model": summary["model_path"],
        "outputs": outputs,
    }
    metrics_path = res_dir / "metrics.json"
    atomic_write_json(metrics_path, metrics)
    say("[4/4] done")
    say(
        f"      test slice AUROC {metrics['slice_auroc']:.3f} (all slices), "
        f"{metrics['slice_auroc_healthy_subjects_vs_lesion_ge30px']:.3f} (healthy subjects vs slices with >= 30 "
        f"lesion pixels); pixel AUROC (brain) {metrics['pixel_auroc_brain']:.3f}"
    )
    say(f"      model:        {summary['model_path']}")
    for o in outputs:
        say(f"      anomaly map:  {o['anomaly_map']}")
        say(f"      panel:        {o['panel']}")
    say(f"      metrics:      {metrics_path}")
    say(f"      TensorBoard:  tensorboard --logdir {model_dir / 'tensorboard'}")
    return metrics
