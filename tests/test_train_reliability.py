"""``aeflow-cli train`` reliability: resume, atomic checkpoints, Ctrl-C, no silent overwrite, unwritable output."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ignite.engine import Events
from monai.data import DataLoader

import monai_aeflow.compare as compare_mod
import monai_aeflow.engines.run as run_mod
import monai_aeflow.engines.workflow as workflow_mod
from aeflow_cli.main import cli
from monai_aeflow.checkpoint import load_model
from monai_aeflow.engines import TrainingConfig, create_engines
from monai_aeflow.errors import AEFlowInputError
from monai_aeflow.networks import AEFlow

# AE-FLOW with a tiny flow on a tiny synthetic cohort: 15 training slices of 32x32, 2 iterations per epoch
FAST = [
    "--model",
    "aeflow",
    "--synthetic",
    "--n-train",
    "1",
    "--shape",
    "32",
    "32",
    "24",
    "--batch-size",
    "8",
    "--backbone-weights",
    "none",
    "--model-arg",
    "flow_blocks=2",
    "--device",
    "cpu",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _summary(res) -> dict:
    return json.loads(res.output[res.output.index("{") :])


def _hook_trainer(mp: pytest.MonkeyPatch, hook) -> None:
    """Call ``hook(trainer)`` on every trainer the workflow builds (to interrupt it or to watch it)."""
    original = workflow_mod.create_engines

    def patched(*args, **kwargs):
        trainer, evaluator = original(*args, **kwargs)
        hook(trainer)
        return trainer, evaluator

    mp.setattr(workflow_mod, "create_engines", patched)


def _no_data_preparation(mp: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("data preparation must not start")

    mp.setattr(compare_mod, "prepare_data", fail)  # aeflow-cli compare
    mp.setattr(run_mod, "prepare_data", fail)  # aeflow-cli train


def _ctrl_c_in_epoch(epoch: int):
    def hook(trainer):
        @trainer.on(Events.ITERATION_COMPLETED)
        def _interrupt(engine):
            if engine.state.epoch == epoch:
                raise KeyboardInterrupt

    return hook


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A 3-epoch run (``full``) and the same run interrupted by Ctrl-C during epoch 2 (``interrupted``)."""
    root = tmp_path_factory.mktemp("runs")
    full, interrupted = root / "full", root / "interrupted"
    res = _invoke(["train", *FAST, "--epochs", "3", "--out", full, "--json", "-q"])
    assert res.exit_code == 0, res.output
    with pytest.MonkeyPatch.context() as mp:
        _hook_trainer(mp, _ctrl_c_in_epoch(2))
        res_int = _invoke(["train", *FAST, "--epochs", "3", "--out", interrupted, "-q"])
    return {"full": full, "full_summary": _summary(res), "interrupted": interrupted, "interrupted_result": res_int}


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _final_checkpoint(run: Path) -> Path:
    (path,) = glob.glob(str(run / "checkpoint_final_iteration=*.pt"))
    return Path(path)


# ------------------------------------------------------------------------------------------------------
# case 1: --resume
# ------------------------------------------------------------------------------------------------------


def test_resume_after_ctrl_c_continues_like_an_uninterrupted_run(runs, tmp_path):
    res = runs["interrupted_result"]
    assert res.exit_code == 130, res.output
    run = tmp_path / "run"
    shutil.copytree(runs["interrupted"], run)
    assert sorted(p.name for p in run.glob("checkpoint*.pt")) == ["checkpoint_epoch=1.pt"]  # epoch 2 was lost

    started: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        _hook_trainer(mp, lambda t: t.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch)))
        res = _invoke(["train", "--resume", run, "--json", "-q"])
    assert res.exit_code == 0, res.output
    summary = _summary(res)
    assert started == [2, 3]  # epoch 1 restored, not repeated
    assert summary["epochs"] == 3 and summary["iterations"] == runs["full_summary"]["iterations"]
    # best metric restored: same best epoch and AUROC as the run that was never interrupted
    assert summary["best_epoch"] == runs["full_summary"]["best_epoch"]
    assert summary["best_val_auroc"] == pytest.approx(runs["full_summary"]["best_val_auroc"], abs=1e-6)

    # same weights, optimiser state and trainer state as the uninterrupted run (same seed, restored RNG)
    ref, got = _state(_final_checkpoint(runs["full"])), _state(_final_checkpoint(run))
    assert got["trainer"]["iteration"] == ref["trainer"]["iteration"]
    for key, value in ref["network"].items():
        torch.testing.assert_close(got["network"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for pid, st in ref["optimizer"]["state"].items():
        torch.testing.assert_close(got["optimizer"]["state"][pid]["exp_avg"], st["exp_avg"], rtol=1e-5, atol=1e-7)
    ref_model, _ = load_model(runs["full"] / "model.pt")
    got_model, _ = load_model(run / "model.pt")
    for (key, a), b in zip(ref_model.state_dict().items(), got_model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
    # one checkpoint per kind: the runs do not leave stale checkpoints behind
    assert sorted(p.name for p in run.glob("checkpoint*.pt")) == ["checkpoint_epoch=3.pt", _final_checkpoint(run).name]


def test_resume_from_a_checkpoint_file_restores_its_weights(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["interrupted"], run)
    ckpt = run / "checkpoint_epoch=1.pt"
    saved = _state(ckpt)
    seen: dict = {}

    def watch(trainer):
        @trainer.on(Events.EPOCH_STARTED)
        def _weights(engine):
            seen.setdefault("epoch", engine.state.epoch)
            seen.setdefault("network", {k: v.clone() for k, v in engine.network.state_dict().items()})
            seen.setdefault("lr", engine.optimizer.param_groups[0]["lr"])

    with pytest.MonkeyPatch.context() as mp:
        _hook_trainer(mp, watch)
        res = _invoke(["train", "--resume", ckpt, "--epochs", "2", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert seen["epoch"] == 2 and _summary(res)["epochs"] == 2
    for key, value in saved["network"].items():
        assert torch.equal(seen["network"][key], value), key


def test_resume_refuses_conflicting_options_and_finished_runs(runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs["interrupted"], run)
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    _no_data_preparation(monkeypatch)

    res = _invoke(["train", "--resume", run, "--lr", "0.5", "-q"])
    assert res.exit_code == 2 and "--lr" in res.output and "Traceback" not in res.output, res.output
    res = _invoke(["train", "--resume", run, "--shape", "64", "64", "32", "-q"])
    assert res.exit_code == 2 and "--shape" in res.output, res.output
    res = _invoke(["train", "--resume", run, "--out", tmp_path / "elsewhere", "-q"])
    assert res.exit_code == 2 and "--out" in res.output, res.output
    res = _invoke(["train", "--resume", run, "--overwrite", "-q"])
    assert res.exit_code == 2 and "--overwrite" in res.output, res.output
    res = _invoke(["train", "--resume", runs["full"], "-q"])  # finished: nothing to resume
    assert res.exit_code == 2 and "3 epochs" in res.output and "--epochs" in res.output, res.output
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before

    # repeating an option with the run's own value is not a conflict: the run goes on to data preparation
    def sentinel(*args, **kwargs):
        raise AEFlowInputError("data preparation reached")

    monkeypatch.setattr(run_mod, "prepare_data", sentinel)
    res = _invoke(["train", "--resume", run, "--model", "aeflow", "--shape", "32", "32", "24", "-q"])
    assert res.exit_code == 2 and "data preparation reached" in res.output, res.output


# ------------------------------------------------------------------------------------------------------
# case 2: atomic checkpoints
# ------------------------------------------------------------------------------------------------------


def _tiny_engines(out: Path):
    gen = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(1, 32, 32, generator=gen)} for _ in range(8)]
    loader = DataLoader(items, batch_size=4)
    net = AEFlow(backbone="resnet18", backbone_weights=None, flow_blocks=2)
    cfg = TrainingConfig(output_dir=str(out), max_epochs=1, progress=False, device="cpu")
    return create_engines(net, loader, None, cfg)


def test_checkpoints_are_written_to_a_temporary_name_then_renamed(tmp_path, monkeypatch):
    real_save = torch.save
    targets: list[str] = []

    def save_then_fail(obj, f, *args, **kwargs):  # a disk that fills up half-way through the checkpoint
        targets.append(os.fspath(f))
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 first bytes only")
        raise OSError(28, "No space left on device")

    trainer, _ = _tiny_engines(tmp_path / "a")
    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError):
        trainer.run()
    assert targets and all("checkpoint_epoch=1.pt" != Path(t).name for t in targets), targets
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file()) == []  # nothing partial left

    def recording_save(obj, f, *args, **kwargs):
        targets.append(os.fspath(f))
        return real_save(obj, f, *args, **kwargs)

    targets.clear()
    monkeypatch.setattr(torch, "save", recording_save)
    trainer, _ = _tiny_engines(tmp_path / "b")
    trainer.run()
    written = sorted(p.name for p in (tmp_path / "b").glob("checkpoint*.pt"))
    assert written == ["checkpoint_epoch=1.pt", "checkpoint_final_iteration=2.pt"]
    assert not {Path(t).name for t in targets} & set(written)  # never written under the final name
    for name in written:
        raw = torch.load(tmp_path / "b" / name, map_location="cpu", weights_only=True)  # plain state dicts
        assert {"network", "optimizer", "trainer", "config"} <= set(raw)


# ------------------------------------------------------------------------------------------------------
# case 3: a corrupt checkpoint is refused before data preparation
# ------------------------------------------------------------------------------------------------------


def test_corrupt_checkpoint_is_a_one_line_error_before_data_preparation(tmp_path, monkeypatch):
    _no_data_preparation(monkeypatch)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    res = _invoke(["train", "--resume", bad, "--data", tmp_path / "no_such_data", "-q"])
    assert res.exit_code == 2 and "bad.pt" in res.output and "checkpoint" in res.output, res.output
    assert "no_such_data" not in res.output and "Traceback" not in res.output

    run = tmp_path / "run"  # a run folder whose checkpoint was cut short (killed while writing)
    run.mkdir()
    torch.save({"network": {"w": torch.zeros(1000)}, "trainer": {"iteration": 2}}, run / "checkpoint_epoch=1.pt")
    data = (run / "checkpoint_epoch=1.pt").read_bytes()
    (run / "checkpoint_epoch=1.pt").write_bytes(data[: len(data) // 2])
    res = _invoke(["train", "--resume", run, "-q"])
    assert res.exit_code == 2 and "checkpoint_epoch=1.pt" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1

    model = tmp_path / "model.pt"  # a model file holds no optimiser nor trainer state
    torch.save({"config": {"model": {}}, "network": {}}, model)
    res = _invoke(["train", "--resume", model, "-q"])
    assert res.exit_code == 2 and "model.pt" in res.output and "resum" in res.output, res.output

    res = _invoke(["train", "--resume", tmp_path / "empty_run", "-q"])
    assert res.exit_code == 2 and "empty_run" in res.output, res.output


# ------------------------------------------------------------------------------------------------------
# case 4: Ctrl-C
# ------------------------------------------------------------------------------------------------------

_CTRL_C_SCRIPT = """
import os, signal, sys
# a terminal's Ctrl-C: Python's own handler, even where the test runner's process passed SIGINT down as ignored
# (an ignored signal stays ignored across exec, and Python then installs no handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
from ignite.engine import Events
import monai_aeflow.engines.workflow as wf

_create = wf.create_engines

def _create_and_press_ctrl_c(*args, **kwargs):
    trainer, evaluator = _create(*args, **kwargs)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _ctrl_c(engine):
        if engine.state.epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)

    return trainer, evaluator

wf.create_engines = _create_and_press_ctrl_c
from aeflow_cli.main import cli
cli(sys.argv[1:], prog_name="aeflow-cli")
"""


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    script = tmp_path / "press_ctrl_c.py"
    script.write_text(_CTRL_C_SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), "train", *FAST, "--epochs", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "terminating due to exception" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and f"aeflow-cli train --resume {out}" in last, last
    assert [p.name for p in out.glob("checkpoint*.pt")] == ["checkpoint_epoch=1.pt"]


# ------------------------------------------------------------------------------------------------------
# case 5: a folder that holds a run is not overwritten silently
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", ["model.pt", "checkpoint_epoch=4.pt"])
def test_train_refuses_a_folder_with_a_run(tmp_path, monkeypatch, existing):
    _no_data_preparation(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / existing).write_bytes(b"previous run")
    res = _invoke(["train", *FAST, "--epochs", "1", "--out", out, "-q"])
    assert res.exit_code == 2 and str(out) in res.output and "--overwrite" in res.output, res.output
    assert "--resume" in res.output and "Traceback" not in res.output
    assert (out / existing).read_bytes() == b"previous run"


def test_train_overwrite_removes_the_previous_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("model.pt", "checkpoint_epoch=4.pt", "checkpoint_final_iteration=99.pt"):
        (out / name).write_bytes(b"previous run")
    res = _invoke(["train", *FAST, "--epochs", "1", "--no-validation", "--out", out, "--overwrite", "-q"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.glob("*.pt"))
    assert names == ["checkpoint_epoch=1.pt", "checkpoint_final_iteration=2.pt", "model.pt"]
    load_model(out / "model.pt")  # the new model


def test_compare_refuses_a_folder_with_results(tmp_path, monkeypatch):
    _no_data_preparation(monkeypatch)
    out = tmp_path / "cmp"
    (out / "models" / "ae").mkdir(parents=True)
    (out / "models" / "ae" / "model.pt").write_bytes(b"previous run")
    res = _invoke(["compare", "--models", "ae", "--synthetic", "--epochs", "1", "--out", out, "-q"])
    assert res.exit_code == 2 and str(out) in res.output and "--overwrite" in res.output, res.output
    assert (out / "models" / "ae" / "model.pt").read_bytes() == b"previous run"


# ------------------------------------------------------------------------------------------------------
# case 6: an output folder that cannot be written
# ------------------------------------------------------------------------------------------------------


def test_output_folder_under_a_file_is_an_error_before_data_preparation(tmp_path, monkeypatch):
    _no_data_preparation(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    res = _invoke(["train", *FAST, "--epochs", "1", "--out", tmp_path / "a_file" / "run", "-q"])
    assert res.exit_code == 2 and "a_file" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_output_folder_is_an_error_before_data_preparation(tmp_path, monkeypatch):
    _no_data_preparation(monkeypatch)
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        res = _invoke(["train", *FAST, "--epochs", "1", "--out", parent / "run", "-q"])
        assert res.exit_code == 2 and "ro" in res.output and "Traceback" not in res.output, res.output
    finally:
        parent.chmod(0o755)


def test_a_model_with_a_discriminator_is_not_resumed_without_it(tmp_path):
    trainer, _ = _tiny_engines(tmp_path / "a")
    trainer.run()
    net, _ = compare_mod.build_model("vqgan", 1, (32, 32))
    items = [{"image": torch.rand(1, 32, 32)} for _ in range(4)]
    cfg = TrainingConfig(str(tmp_path / "a"), max_epochs=3, progress=False, device="cpu", resume=str(tmp_path / "a"))
    with pytest.raises(AEFlowInputError, match="vqgan cannot be resumed"):
        create_engines(net, DataLoader(items, batch_size=4), None, cfg)
