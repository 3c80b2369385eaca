"""User mistakes found by a second audit of every ``aeflow-cli`` command: each gives exit code 2, one ``Error:``
line naming the option or the file, no traceback, and leaves nothing behind (or untouched what was there).

Unknown or absent devices, non-finite thresholds, learning rates and spacings, network arguments that torch
rejects, output folders that cannot be created (a file in the way), an export whose metadata path is a
folder, a demo folder that holds a previous run, and an empty brain mask in ``evaluate``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from aeflow_cli.main import cli

# a tiny synthetic cohort: the mistakes below are found before (or right after) the data are prepared
TINY = ["--synthetic", "--n-train", "1", "--shape", "32", "32", "16", "--device", "cpu", "--epochs", "1"]


def _error_line(args: list[str]) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


# -- devices -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["bogus", "meta", "mps", "cuda:7"])
def test_score_refuses_a_device_this_machine_lacks(small_volume_model, tmp_path, device):
    image = small_volume_model["lesioned"][0]["image"]
    args = ["score", image, "-m", small_volume_model["model"], "-o", tmp_path / "out", "--device", device, "-q"]
    line = _error_line(args)
    if device != "cuda:7":
        assert "--device" in line and device in line, line
    else:  # this machine has no CUDA at all
        assert "CUDA" in line and "--device cpu" in line, line
    assert not any((tmp_path / "out").glob("*.nii.gz"))


def test_resolve_device_accepts_what_is_there():
    import torch

    from monai_aeflow.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


# -- numbers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_score_refuses_a_threshold_that_is_not_finite(small_volume_model, tmp_path, value):
    image = small_volume_model["lesioned"][0]["image"]
    out = tmp_path / "out"
    line = _error_line(["score", image, "-m", small_volume_model["model"], "-o", out, "--threshold", value, "-q"])
    assert "threshold" in line and "finite" in line, line
    assert not any(out.glob("*.nii.gz")) if out.exists() else True


@pytest.mark.parametrize(
    ("option", "value"), [("--lr", "-1"), ("--lr", "nan"), ("--lr", "0"), ("--weight-decay", "-1")]
)
def test_train_refuses_optimizer_settings_before_any_data(tmp_path, option, value):
    out = tmp_path / "run"
    line = _error_line(["train", "--model", "ae", *TINY, "--out", out, option, value])
    assert option in line and value in line, line
    assert not out.exists()  # refused before the cohort was generated


def test_compare_and_demo_refuse_a_negative_learning_rate_before_any_work(tmp_path):
    out = tmp_path / "cmp"
    line = _error_line(["compare", "--models", "intensity,ae", *TINY, "--out", out, "--lr", "-1"])
    assert "--lr" in line, line
    assert not out.exists()
    demo = tmp_path / "demo"
    line = _error_line(["demo", "--out", demo, "--lr", "-1", "--device", "cpu", "--quiet"])
    assert "--lr" in line, line
    assert not demo.exists()


def test_train_refuses_a_negative_spacing(tmp_path):
    out, data = tmp_path / "run", tmp_path / "dataset"
    data.mkdir()
    line = _error_line(["train", "--model", "intensity", "--data", data, "--spacing", "-2", "--out", out])
    assert "--spacing" in line and "-2" in line, line
    assert not out.exists()


def test_a_network_argument_torch_rejects_names_the_argument_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    line = _error_line(["train", "--model", "ae", *TINY, "--model-arg", "latent_channels=-5", "--out", out])
    assert "--model-arg" in line and "latent_channels=-5" in line, line
    assert not out.exists()  # the cohort generated before the network was built is removed again


def test_a_failed_train_keeps_a_folder_that_was_there(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _error_line(["train", "--model", "ae", *TINY, "--model-arg", "latent_channels=-5", "--out", out])
    assert _tree(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}  # its data/ removed, the rest kept


# -- output folders ------------------------------------------------------------------------------------------------


def test_train_compare_and_demo_under_a_file_say_so(a_file):
    for args in (
        ["train", "--model", "intensity", *TINY, "--out", a_file / "run"],
        ["compare", "--models", "intensity", *TINY, "--out", a_file / "cmp"],
        ["demo", "--out", a_file / "demo", "--device", "cpu", "--quiet"],
        ["demo", "--out", a_file, "--device", "cpu", "--quiet"],
    ):
        line = _error_line(args)
        assert str(a_file) in line, (args, line)
    assert a_file.read_text() == "not a folder"


def test_export_under_a_file_or_onto_a_folder_is_refused(small_volume_model, tmp_path, a_file):
    model = small_volume_model["model"]
    line = _error_line(["export", model, "--format", "torchscript", "--out", a_file / "net.ts"])
    assert str(a_file) in line, line
    out = tmp_path / "exp" / "net.ts"
    Path(str(out) + ".json").mkdir(parents=True)
    line = _error_line(["export", model, "--format", "torchscript", "--out", out, "--overwrite"])
    assert "net.ts.json" in line and "folder" in line, line
    assert not out.exists()


def test_evaluate_under_a_file_is_refused_before_the_work(tmp_path, a_file):
    import nibabel as nib

    cases = tmp_path / "cases"
    for name in ("case0", "case1"):
        for kind in ("anomaly", "label", "mask"):
            (cases / kind).mkdir(parents=True, exist_ok=True)
            data = np.ones((8, 8, 4), np.float32) if kind == "mask" else np.zeros((8, 8, 4), np.float32)
            nib.save(nib.Nifti1Image(data, np.eye(4)), cases / kind / f"{name}.nii.gz")
    args = ["evaluate", "--test-maps", cases / "anomaly", "--test-labels", cases / "label"]
    line = _error_line([*args, "--test-masks", cases / "mask", "--threshold", "0.5", "-o", a_file / "report"])
    assert str(a_file) in line and "cannot be created" in line, line


def test_evaluate_names_the_empty_brain_mask(tmp_path):
    import nibabel as nib

    cases = tmp_path / "cases"
    for kind in ("anomaly", "label", "mask"):
        (cases / kind).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), cases / kind / "case0.nii.gz")
    args = ["evaluate", "--test-maps", cases / "anomaly", "--test-labels", cases / "label", "--test-masks"]
    line = _error_line([*args, cases / "mask", "--threshold", "0.5", "-o", tmp_path / "report", "-q"])
    assert str(cases / "mask" / "case0.nii.gz") in line and "empty" in line, line


# -- the demo does not replace a previous run without --overwrite ----------------------------------------------------


def test_demo_refuses_a_folder_holding_a_previous_run(tmp_path):
    out = tmp_path / "demo"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.pt").write_bytes(b"an earlier model")
    (out / "results").mkdir()
    (out / "results" / "metrics.json").write_text("{}")
    before = _tree(out)
    line = _error_line(["demo", "--out", out, "--device", "cpu", "--quiet"])
    assert "--overwrite" in line and "model.pt" in line, line
    assert _tree(out) == before


# -- the last resort: an OSError of a path found late ----------------------------------------------------------------


def test_run_guarded_turns_a_path_error_into_one_line():
    import click

    from aeflow_cli.common import run_guarded

    def fails() -> None:
        raise NotADirectoryError(20, "Not a directory", "out/afile/sub")

    with pytest.raises(click.ClickException) as info:
        run_guarded(fails)
    assert info.value.exit_code == 2
    assert info.value.message == "out/afile/sub: Not a directory"

    def bug() -> None:
        raise OSError("no file involved")

    with pytest.raises(OSError):  # not a path problem: stays a traceback (exit code 1)
        run_guarded(bug)


def test_atomic_write_and_make_folder_name_the_path(tmp_path, a_file):
    from monai_aeflow.errors import AEFlowInputError
    from monai_aeflow.fileio import atomic_write_text, make_folder

    with pytest.raises(AEFlowInputError, match="afile"):
        make_folder(a_file / "sub")
    with pytest.raises(AEFlowInputError, match="is a file"):
        make_folder(a_file)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(AEFlowInputError, match="is a folder"):
        atomic_write_text(tmp_path / "dir.json", "{}")
    assert make_folder(tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("extra", [["--spatial-size", "30", "30"], ["--fractions", "-0.2", "0.6", "0.6"]])
def test_dataset_options_with_a_synthetic_cohort_are_refused_not_ignored(tmp_path, extra):
    out = tmp_path / "run"
    line = _error_line(["train", "--model", "intensity", *TINY, *extra, "--out", out])
    assert extra[0] in line and "--data" in line, line
    assert not out.exists()
