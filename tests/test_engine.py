"""The MONAI training workflow: losses fall, TensorBoard logs, checkpoints are plain and resumable."""

from __future__ import annotations

import glob

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader
from sklearn.metrics import roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monai_aeflow.checkpoint import load_model
from monai_aeflow.data.synthetic import make_slices
from monai_aeflow.engines import TrainingConfig, create_engines, slice_labels, train
from monai_aeflow.networks import AEFlow


def _items(slices: dict, idx=None) -> list[dict]:
    idx = range(len(slices["image"])) if idx is None else idx
    return [
        {"image": torch.from_numpy(slices["image"][i]), "label": torch.from_numpy(slices["label"][i]).float()}
        for i in idx
    ]


def _loaders(seed: int = 0):
    healthy = make_slices(2, lesion=False, seed=seed, shape=(64, 64, 24))
    lesion = make_slices(1, lesion=True, seed=seed + 100, shape=(64, 64, 24))
    train_loader = DataLoader(_items(healthy), batch_size=8, shuffle=True)
    val = _items(make_slices(1, lesion=False, seed=seed + 50, shape=(64, 64, 24))) + _items(lesion)
    return train_loader, DataLoader(val, batch_size=16), val


def _net() -> AEFlow:
    return AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=4)


def test_slice_labels():
    mask = torch.zeros(3, 1, 4, 4)
    mask[1, 0, 2, 2] = 1
    assert slice_labels(mask, 3, torch.device("cpu")).tolist() == [0, 1, 0]
    assert slice_labels(torch.tensor([0, 1, 1]), 3, torch.device("cpu")).tolist() == [0, 1, 1]
    assert slice_labels(None, 2, torch.device("cpu")).tolist() == [0, 0]


def test_training_logs_checkpoints_and_validation_auroc(tmp_path):
    train_loader, val_loader, val_items = _loaders()
    cfg = TrainingConfig(output_dir=str(tmp_path / "run"), max_epochs=3, lr=1e-3, progress=False)
    trainer, evaluator = create_engines(_net(), train_loader, val_loader, cfg)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    scores = []
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: scores.append(e.state.output["pred"].cpu().numpy())
    )
    trainer.run()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # it learns

    # the key metric is MONAI's ROCAUC over slice labels: check it against scikit-learn
    truth = np.array([float(it["label"].any()) for it in val_items])
    last = np.concatenate(scores[-len(scores) // 3 :])
    assert abs(evaluator.state.metrics["val_auroc"] - roc_auc_score(truth, last)) < 1e-6
    assert "val_pixel_auroc" in evaluator.state.metrics

    run = tmp_path / "run"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_flow", "train/loss_recon", "train/lr", "val_auroc"} <= scalars
    images = acc.Images("val/input_recon_map_truth")
    assert len(images) == 3 and images[0].width == 4 * 64

    ckpts = glob.glob(str(run / "checkpoint_epoch=*.pt"))
    assert ckpts
    raw = torch.load(ckpts[0], map_location="cpu", weights_only=True)  # plain state dicts only
    assert {"network", "optimizer", "trainer", "config"} <= set(raw)
    model, record = load_model(run / "model.pt")
    assert record["config"]["training"]["metrics"]["val_auroc"] >= 0.0
    assert "calibration" in record["config"]["score"]
    assert record["config"]["model"]["backbone"] == "resnet18"


def test_resume_continues_from_checkpoint(tmp_path):
    train_loader, val_loader, _ = _loaders(seed=3)
    first = train(_net(), train_loader, None, TrainingConfig(str(tmp_path / "a"), max_epochs=2, progress=False))
    assert first["epochs"] == 2
    ckpt = glob.glob(str(tmp_path / "a" / "checkpoint_final_iteration=*.pt"))[0]
    net = _net()
    seen_start = []
    cfg = TrainingConfig(str(tmp_path / "b"), max_epochs=4, progress=False, resume=ckpt)
    trainer, _ = create_engines(net, train_loader, None, cfg)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen_start.append(e.state.epoch))
    trainer.run()
    assert seen_start == [3, 4]  # epochs 1-2 were restored, not repeated
    resumed_state = torch.load(ckpt, weights_only=True)["network"]
    assert not torch.equal(net.state_dict()["decoder.layers.0.weight"], resumed_state["decoder.layers.0.weight"])
