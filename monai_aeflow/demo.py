"""The end-to-end demo: synthetic cohort -> AE-FLOW training -> anomaly map of a lesioned volume on disk.

Used by ``aeflow-cli demo``; every step uses the package's own data lists (:func:`~monai_aeflow.data.datalists.
prepare_data`: the cohort is generated, split by the one synthetic rule and preprocessed as for ``aeflow-cli
train``), engine, inference and visualisation. The intensity baseline of the model registry is scored on the same
test subjects, beside AE-FLOW.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from monai_aeflow.checkpoint import load_model
from monai_aeflow.data.datalists import DataConfig, SyntheticCohortConfig, prepare_data
from monai_aeflow.data.slices import SliceDataset, select_slices
from monai_aeflow.engines.metrics import ReconstructionQuality
from monai_aeflow.engines.run import train_model
from monai_aeflow.engines.run_folder import remove_unused_folders
from monai_aeflow.engines.workflow import (
    check_optimizer_settings,
    clear_previous_run,
    previous_run_files,
    resolve_device,
)
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.fileio import atomic_write_json, make_folder, save_nifti
from monai_aeflow.inference.volume import score_volume
from monai_aeflow.models import build_model, describe_encoder_weights
from monai_aeflow.visualize import most_anomalous_slices, save_slice_panel

__all__ = ["DemoConfig", "run_demo"]

logger = logging.getLogger("monai_aeflow.demo")

BASELINE = "intensity"
"""The registry model scored beside AE-FLOW on the same test subjects (the image itself, median-filtered)."""


@dataclass
class DemoConfig:
    """Settings of the demo (CPU-sized defaults: about 30 s on two idle cores).

    Small batches and a learning rate of 2e-3 give the decoder enough steps to reconstruct the anatomy within the
    CPU budget (held-out reconstruction MSE about a third of the mean image's after 100 steps).

    Args:
        output_dir: where data, model, maps, pictures and metrics go.
        n_train: healthy training subjects.
        n_val_healthy: healthy validation subjects.
        n_val_lesion: lesioned validation subjects.
        n_test: lesioned test subjects.
        n_test_healthy: healthy test subjects (their slices are the negatives of the slice-level AUROC).
        shape: volume shape (in-plane sizes multiples of 16; 128 x 128 gives the stride-16 encoder an 8 x 8
            bottleneck).
        spacing: voxel size in mm.
        epochs: training epochs.
        batch_size: slices per batch.
        lr: Adam learning rate.
        backbone: ``"efficientnet_lite0"`` (pretrained offline, the default), ``"resnet18"`` or
            ``"wide_resnet50_2"`` (the paper's, for a GPU).
        backbone_weights: ``"auto"`` (ImageNet weights of ``backbone``, else the pretrained EfficientNet-Lite0, with
            a notice), ``"imagenet"``, ``"none"`` (random) or a local state-dict path.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        min_brain_fraction: keep axial slices whose brain area is at least this fraction of the largest (the
            data lists' default).
        seed: seed of data generation, of the split and of training.
        progress: show progress bars.
        overwrite: replace a previous demo run in ``output_dir`` (its model, checkpoints and results); without
            it such a folder is refused before anything is written.
    """

    output_dir: str = "aeflow_demo"
    n_train: int = 6
    n_val_healthy: int = 1
    n_val_lesion: int = 2
    n_test: int = 2
    n_test_healthy: int = 1
    shape: tuple[int, int, int] = (128, 128, 32)
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.75)
    epochs: int = 4
    batch_size: int = 8
    lr: float = 2e-3
    backbone: str = "efficientnet_lite0"
    backbone_weights: str = "auto"
    device: str = "auto"
    min_brain_fraction: float = DataConfig.min_area_fraction
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    def data_config(self) -> DataConfig:
        """The data lists' settings of the demo's cohort (:func:`~monai_aeflow.data.datalists.prepare_data`)."""
        cohort = SyntheticCohortConfig(
            n_train=self.n_train,
            n_val_healthy=self.n_val_healthy,
            n_val_lesion=self.n_val_lesion,
            n_test_healthy=self.n_test_healthy,
            n_test_lesion=self.n_test,
            shape=tuple(self.shape),
            spacing=tuple(self.spacing),
            contrast="flair",
            seed=self.seed,
        )
        data_dir = str(Path(self.output_dir) / "data")
        return DataConfig(
            synthetic=cohort, synthetic_dir=data_dir, split_seed=self.seed, min_area_fraction=self.min_brain_fraction
        )


def _auroc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(truth, scores)) if 0 < truth.sum() < truth.size else None


def _test_metrics(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Slice and pixel AUROCs over the test subjects (rows: one per subject, of one model)."""
    st = np.concatenate([r["slice_truth"] for r in rows])
    ss = np.concatenate([r["slice_scores"] for r in rows])
    clear = np.concatenate([r["healthy_subject"] | (r["slice_area"] >= 30) for r in rows])
    lesioned = [r for r in rows if not r["healthy_subject"].all()]
    pt = np.concatenate([r["pixel_truth"] for r in lesioned]) if lesioned else np.zeros(0, bool)
    ps = np.concatenate([r["pixel_scores"] for r in lesioned]) if lesioned else np.zeros(0)
    return {
        "slice_auroc": _auroc(st, ss),
        "slice_auroc_healthy_subjects_vs_lesion_ge30px": _auroc(st[clear], ss[clear]),
        "pixel_auroc_brain": _auroc(pt, ps),
    }


def _score_subject(network: torch.nn.Module, volume: Mapping[str, Any], keep: np.ndarray, batch: int, beta: float):
    image = volume["image"].as_subclass(torch.Tensor)
    mask = np.asarray(volume["mask"][0]) > 0
    truth = np.asarray(volume["label"][0]) > 0
    result = score_volume(network, image, batch_size=batch, beta=beta)
    per_slice = truth[..., keep].reshape(-1, len(keep))
    row = {
        "slice_scores": result.slice_scores[keep],
        "slice_truth": per_slice.any(0),
        "slice_area": per_slice.sum(0),
        "healthy_subject": np.full(len(keep), not truth.any()),
        "pixel_scores": result.anomaly_map[mask],
        "pixel_truth": truth[mask],
    }
    return result, row


def _reconstruction(
    ckpt: Mapping[str, Any], train: Sequence[Mapping[str, Any]], val: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The kept model's reconstruction quality on the healthy validation slices, beside the mean training image's.

    The model's PSNR / SSIM are those its validation stored in ``model.pt``; the mean training image is scored on
    the same slices with the same metrics (:class:`~monai_aeflow.engines.metrics.ReconstructionQuality`): a decoder
    that learned only a grey blob scores about as well as that image.
    """
    stored = ckpt["config"].get("training", {}).get("metrics", {})
    healthy = [item["image"].as_subclass(torch.Tensor) for item in val if int(item["slice_label"]) == 0]
    out: dict[str, Any] = {"val_psnr": stored.get("val_psnr"), "val_ssim": stored.get("val_ssim")}
    out["healthy_val_slices"] = len(healthy)
    if healthy:
        mean = torch.stack([item["image"].as_subclass(torch.Tensor) for item in train]).float().mean(0)
        images = torch.stack(healthy).float()
        quality = ReconstructionQuality()
        quality.update(images, mean.expand_as(images))
        blob = quality.compute()
        out.update(mean_image_psnr=blob["psnr"], mean_image_ssim=blob["ssim"])
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate a synthetic cohort, train AE-FLOW on its healthy slices and score the test volumes.

    Writes into ``cfg.output_dir``: ``data/`` (the cohort as NIfTI), ``model/`` (``model.pt``, resumable
    checkpoints, TensorBoard logs), ``results/<subject>_anomaly.nii.gz`` (same shape and affine as the
    input), ``results/<subject>_panel.png`` and ``results/metrics.json`` (AE-FLOW's test metrics, the intensity
    baseline's on the same subjects, the kept model's reconstruction PSNR / SSIM beside the mean training image's,
    the encoder weights used and timings).

    Args:
        cfg: the demo settings.
        say: where progress messages go.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        AEFlowInputError: in-plane sizes that are not multiples of 16, a learning rate that is not a positive number,
            an output folder that cannot be created or holds a previous demo run (without ``cfg.overwrite``), or
            encoder weights that cannot be loaded (nothing is left behind then).
    """
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    model_dir, res_dir = out / "model", out / "results"
    if any(s % 16 for s in cfg.shape[:2]):
        raise AEFlowInputError(f"in-plane shape {tuple(cfg.shape[:2])} must be multiples of 16")
    check_optimizer_settings(cfg.lr, 0.0)
    device = resolve_device(cfg.device)
    metrics = res_dir / "metrics.json"
    previous = previous_run_files(model_dir) + ([metrics] if metrics.exists() else [])
    if previous and not cfg.overwrite:
        raise AEFlowInputError(
            f"holds a previous demo run ({previous[0].relative_to(out)}); use --overwrite to replace it", path=out
        )
    created = [p for p in (out, out / "data") if not p.exists()]
    make_folder(out)
    if cfg.overwrite:
        clear_previous_run(model_dir)
    try:
        return _run(cfg, say, t0, device)
    except AEFlowInputError:  # e.g. encoder weights that cannot be loaded: leave nothing behind
        remove_unused_folders(model_dir, created)
        raise


def _run(cfg: DemoConfig, say: Callable[[str], None], t0: float, device: torch.device) -> dict[str, Any]:
    """:func:`run_demo` once its settings and output folder are checked."""
    out = Path(cfg.output_dir)
    model_dir, res_dir = out / "model", out / "results"
    data_cfg = cfg.data_config()

    n_healthy = cfg.n_train + cfg.n_val_healthy + cfg.n_test_healthy
    say(f"[1/4] generating {n_healthy} healthy and {cfg.n_val_lesion + cfg.n_test} lesioned synthetic subjects")
    data = prepare_data(data_cfg, out, progress=cfg.progress)
    val_items = SliceDataset(data.val, min_area_fraction=cfg.min_brain_fraction, healthy_only=False)
    say(
        f"      {data_cfg.synthetic_dir}: {len(data.train)} healthy training slices, {len(val_items)} validation slices"
    )

    torch.manual_seed(cfg.seed)
    net, info = build_model(
        "aeflow", data.in_channels, data.image_size, cfg.backbone, cfg.backbone_weights, say=lambda m: say(f"      {m}")
    )
    weights = describe_encoder_weights(info["encoder_weights"])
    say(f"[2/4] training AE-FLOW ({weights}) for {cfg.epochs} epochs on {device}")
    summary = train_model(
        net,
        data.train,
        model_dir,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        device=str(device),
        seed=cfg.seed,
        preprocessing=data.preprocessing,
        val_dataset=val_items,
        progress=cfg.progress,
    )
    say(
        f"      {summary['images_per_second']:.1f} slices/s, best validation slice AUROC "
        f"{summary['best_val_auroc']:.3f} (epoch {summary['best_epoch']})"
    )

    say(f"[3/4] scoring the test volumes with AE-FLOW and the {BASELINE} baseline")
    model, ckpt = load_model(summary["model_path"], device)
    beta = ckpt["config"]["score"]["beta"]
    reconstruction = _reconstruction(ckpt, data.train, val_items)
    baseline, _ = build_model(BASELINE, data.in_channels, data.image_size)
    baseline = baseline.to(device).eval()
    res_dir.mkdir(parents=True, exist_ok=True)
    rows, baseline_rows, outputs = [], [], []
    batch = cfg.batch_size * 2
    for rec, vol in zip(data.splits["test"], data.test, strict=True):
        keep = select_slices(np.asarray(vol["mask"][0]) > 0, None, cfg.min_brain_fraction)
        result, row = _score_subject(model, vol, keep, batch, beta)
        rows.append(row)
        baseline_rows.append(_score_subject(baseline, vol, keep, batch, beta)[1])
        src = nib.load(rec["image"])
        if src.shape != result.anomaly_map.shape:
            raise RuntimeError(f"anomaly map shape {result.anomaly_map.shape} differs from the input {src.shape}")
        map_path = res_dir / f"{rec['subject_id']}_anomaly.nii.gz"
        img = nib.Nifti1Image(result.anomaly_map.astype(np.float32), src.affine)
        save_nifti(img, map_path)
        truth = np.asarray(vol["label"][0]) > 0
        lesion_area = truth.reshape(-1, truth.shape[-1]).sum(0)
        if lesion_area.any():
            show = sorted(np.argsort(lesion_area)[::-1][:4].tolist())
        else:
            show = most_anomalous_slices(result.slice_scores, 4)
        panel = save_slice_panel(
            res_dir / f"{rec['subject_id']}_panel.png",
            vol["image"].as_subclass(torch.Tensor)[0].numpy(),
            show,
            reconstruction=result.reconstruction,
            anomaly_map=result.anomaly_map,
            truth=truth.astype(np.float32),
            slice_scores=result.slice_scores,
            title=f"AE-FLOW on {rec['subject_id']} (synthetic)",
        )
        outputs.append({"subject_id": rec["subject_id"], "anomaly_map": str(map_path), "panel": str(panel)})

    st = np.concatenate([r["slice_truth"] for r in rows])
    ours, theirs = _test_metrics(rows), _test_metrics(baseline_rows)
    metrics = {
        "test_subjects": [o["subject_id"] for o in outputs],
        "test_slices": int(st.size),
        "test_lesioned_slices": int(st.sum()),
        **ours,
        BASELINE: {"model": BASELINE, **theirs},
        "best_val_slice_auroc": summary.get("best_val_auroc"),
        "reconstruction": reconstruction,
        "train_subjects": [str(r["subject_id"]) for r in data.splits["train"]],
        "train_slices": len(data.train),
        "train_slices_per_second": summary["images_per_second"],
        "train_seconds": summary["seconds"],
        "backbone": info["hparams"]["backbone"],
        "backbone_weights": info["backbone_weights"],
        "encoder_weights": info["encoder_weights"],
        "device": str(device),
        "wall_seconds": time.perf_counter() - t0,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "model": summary["model_path"],
        "outputs": outputs,
    }
    metrics_path = res_dir / "metrics.json"
    atomic_write_json(metrics_path, metrics)
    say("[4/4] done")
    for name, m in (("AE-FLOW", ours), (BASELINE, theirs)):
        say(
            f"      {name:<9} test slice AUROC {_fmt(m['slice_auroc'])} (all slices), "
            f"{_fmt(m['slice_auroc_healthy_subjects_vs_lesion_ge30px'])} (healthy subjects vs slices with >= 30 "
            f"lesion pixels); pixel AUROC (brain) {_fmt(m['pixel_auroc_brain'])}"
        )
    if reconstruction.get("val_psnr") is not None and reconstruction.get("mean_image_psnr") is not None:
        say(
            f"      reconstruction of the healthy validation slices: PSNR {reconstruction['val_psnr']:.1f} dB, SSIM "
            f"{reconstruction['val_ssim']:.2f} (the mean training image: {reconstruction['mean_image_psnr']:.1f} dB, "
            f"{reconstruction['mean_image_ssim']:.2f})"
        )
    say(f"      model:        {summary['model_path']}")
    for o in outputs:
        say(f"      anomaly map:  {o['anomaly_map']}")
        say(f"      panel:        {o['panel']}")
    say(f"      metrics:      {metrics_path}")
    say(f"      TensorBoard:  tensorboard --logdir {model_dir / 'tensorboard'}")
    return metrics
