"""Bundle runs that must stop early with one clear line: unreadable data, a missing ``dataset_dir``, bad overrides.

The bundle runs are ``python -m monai.bundle run ...`` subprocesses that fail within seconds (before any
training); the data-list checks are also tested through the Python functions the configs call.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from monai_aeflow.bundle import prepare_brain_mri_datalist, prepare_image_datalist
from monai_aeflow.errors import AEFlowInputError

ROOT = Path(__file__).resolve().parents[1]
BRAIN = ROOT / "bundles" / "aeflow_brain_mri"
IMAGES = ROOT / "bundles" / "aeflow_2d_images"
TIMEOUT = 300
# a small random-encoder network, so that nothing is downloaded whatever the run gets to
OFFLINE = ["--backbone", "resnet18", "--backbone_weights", "none", "--image_size", "[32, 32]"]


def _run(bundle: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("AEFLOW_TRACEBACK", None)
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _assert_one_line_error(res: subprocess.CompletedProcess, *expected: str) -> str:
    """The run failed with exit code 2 and its stderr is the one-line message (no traceback)."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    context = f"rc={res.returncode}\nstdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-4000:]}"
    assert lines, context
    last = lines[-1]
    for text in expected:
        assert text in last, context
    assert "Failed to instantiate component" not in res.stderr, context
    assert "Traceback" not in res.stderr and len(lines) <= 2, context
    assert res.returncode == 2, context
    return last


def _volume(path: Path, seed: int = 0, shape: tuple[int, int, int] = (24, 24, 12)) -> None:
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _cohort(folder: Path, n: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"sub{i:02d}.nii.gz" for i in range(1, n + 1)]
    for i, path in enumerate(paths):
        _volume(path, seed=i)
    return paths


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# ------------------------------------------------------------------------------------------------------------
# case 1: unreadable files in dataset_dir
# ------------------------------------------------------------------------------------------------------------


def test_bundle_run_on_unreadable_volumes_names_the_first_bad_file(tmp_path: Path) -> None:
    paths = _cohort(tmp_path / "data")
    for bad in (paths[2], paths[4]):  # sub03, sub05: NIfTI names, garbage content
        bad.write_bytes(b"this is not a NIfTI file\n" * 10)
    _truncate(paths[3])  # sub04: a readable header, half of the voxels
    res = _run(
        BRAIN,
        ["training", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path / "root")]
        + ["--dataset_dir", str(tmp_path / "data"), *OFFLINE],
    )
    last = _assert_one_line_error(res, str(paths[2]), "not a readable NIfTI file")
    assert "sub05" not in last and "sub04" not in last
    assert not (tmp_path / "root" / "models").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_brain_datalist_names_a_truncated_volume(tmp_path: Path, suffix: str) -> None:
    paths = _cohort(tmp_path / "data")
    if suffix == ".nii":
        paths[1].unlink()
        paths[1] = paths[1].with_name("sub02.nii")
        _volume(paths[1], seed=1)
    _truncate(paths[1], 0.6)
    nib.load(str(paths[1]))  # the header alone is fine
    with pytest.raises(AEFlowInputError, match=r"sub02\.nii.* truncated") as info:
        prepare_brain_mri_datalist(tmp_path / "data")
    assert info.value.path == str(paths[1])


def test_brain_datalist_accepts_a_gzip_file_of_several_members(tmp_path: Path) -> None:
    paths = _cohort(tmp_path / "data")
    raw = gzip.decompress(paths[0].read_bytes())
    half = len(raw) // 2
    paths[0].write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))  # e.g. written by bgzip
    lists = prepare_brain_mri_datalist(tmp_path / "data")
    assert sum(len(v) for v in lists.values()) == 6


def test_image_datalist_names_a_truncated_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("normal", "abnormal"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"p{i}_{cls}.png")
    bad = tmp_path / "normal" / "p3_normal.png"
    _truncate(bad, 0.5)
    with pytest.raises(AEFlowInputError, match=r"p3_normal\.png") as info:
        prepare_image_datalist(tmp_path, subject_pattern=r"^(p\d+)_")
    assert info.value.path == str(bad)


# ------------------------------------------------------------------------------------------------------------
# case 2: a dataset_dir that does not exist is an error, not a synthetic cohort
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle", [BRAIN, IMAGES], ids=["brain", "images"])
def test_bundle_run_with_a_missing_dataset_dir_fails_instead_of_generating(bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "BraTS2021"
    res = _run(
        bundle,
        ["training", "--config_file", "configs/train.json", "--bundle_root", str(tmp_path / "root")]
        + ["--dataset_dir", str(missing), *OFFLINE],
    )
    _assert_one_line_error(res, f"dataset_dir {missing} does not exist")
    assert not missing.exists() and not (tmp_path / "root" / "data").exists()


@pytest.mark.parametrize("prepare", [prepare_brain_mri_datalist, prepare_image_datalist], ids=["brain", "images"])
def test_datalists_generate_only_when_asked(prepare: object, tmp_path: Path) -> None:
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AEFlowInputError, match="does not exist"):
        prepare(missing)  # type: ignore[operator]
    with pytest.raises(AEFlowInputError, match="is empty"):
        prepare(empty)  # type: ignore[operator]
    assert not missing.exists() and not any(empty.iterdir())


# ------------------------------------------------------------------------------------------------------------
# case 3: overrides of the wrong type fail before any data is prepared
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bundle", "key", "value"),
    [
        (BRAIN, "max_epochs", "abc"),
        (BRAIN, "batch_size", '"16"'),
        (IMAGES, "learning_rate", "fast"),
        (BRAIN, "device", "tpu"),
        (IMAGES, "model_name", "bogus"),
        (BRAIN, "map_kind", "bogus"),
        (BRAIN, "spacing", "abc"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_bundle_run_with_a_wrong_override_fails_before_data_preparation(
    bundle: Path, key: str, value: str, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    args = ["training", "--config_file", "configs/train.json", "--bundle_root", str(root), f"--{key}", value]
    res = _run(bundle, args)
    _assert_one_line_error(res, key)
    assert not (root / "data").exists(), "the synthetic dataset was generated before the settings were checked"


def test_check_bundle_settings_names_the_key() -> None:
    from monai_aeflow.bundle import check_bundle_settings

    good = {
        "max_epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "weight_decay": 0,
        "alpha": 0.5,
        "beta": 0.9,
        "image_size": [32, 32],
        "split_fractions": [0.6, 0.2, 0.2],
        "amp": False,
        "synthetic": "false",
    }
    check_bundle_settings(**good)
    bad = {
        "max_epochs": [0, 1.5, True, "3"],
        "batch_size": [-1, "16"],
        "learning_rate": [0.0, -1e-3, "1e-3", float("nan")],
        "weight_decay": [-1.0],
        "beta": [1.5],
        "image_size": [32, [32], [32, "32"], [0, 32]],
        "split_fractions": [[0.5, 0.5], [0.6, -0.2, 0.6], [0, 0, 0]],
        "amp": ["false", 1],
        "synthetic": ["no", 0],
    }
    for key, values in bad.items():
        for value in values:
            with pytest.raises(AEFlowInputError, match=rf"^{key} ") as info:
                check_bundle_settings(**{**good, key: value})
            assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="unknown setting"):
        check_bundle_settings(max_epoch=3)
    more_bad = {
        "device": ["tpu", "cuda:9", "meta"],
        "model_name": ["bogus", 3],
        "recipe": ["bogus"],
        "recon_loss": ["l1"],
        "map_kind": ["bogus"],
        "spacing": [0, -2.0, "abc"],
    }
    for key, values in more_bad.items():
        for value in values:
            with pytest.raises(AEFlowInputError, match=rf"^{key} "):
                check_bundle_settings(**{**good, key: value})
    check_bundle_settings(**good, device="cpu", model_name="ae", recipe="paper", recon_loss="ssim", map_kind="flow")
    check_bundle_settings(**good, spacing=None, ckpt_dir="/tmp/new/models", log_dir="/tmp/new/logs")


def test_bundle_folders_under_a_file_fail_before_data_preparation(tmp_path: Path) -> None:
    from monai_aeflow.bundle import check_bundle_settings

    afile = tmp_path / "afile"
    afile.write_text("x")
    for key in ("ckpt_dir", "log_dir"):
        with pytest.raises(AEFlowInputError, match=rf"^{key} .*afile is a file"):
            check_bundle_settings(**{key: str(afile / "models")})
    root = tmp_path / "root"
    args = ["training", "--config_file", "configs/train.json", "--bundle_root", str(root)]
    res = _run(BRAIN, [*args, "--ckpt_dir", str(afile / "models"), *OFFLINE])
    _assert_one_line_error(res, "ckpt_dir")
    assert not (root / "data").exists() and not (root / "logs").exists()


def test_aeflow_refuses_loss_options_it_does_not_take() -> None:
    from monai_aeflow.models.aeflow import make_loss

    with pytest.raises(AEFlowInputError, match="unknown loss option.*bogus.*aeflow"):
        make_loss({"loss_options": {"bogus": 1}})
    make_loss({"loss_options": {}})


def test_backbone_weights_words_give_a_random_encoder() -> None:
    from monai_aeflow.bundle import build_bundle_network
    from monai_aeflow.models import encoder_weights_of

    for word in ("none", "None", "random"):
        net = build_bundle_network("aeflow", backbone="resnet18", backbone_weights=word, flow_blocks=2)
        assert encoder_weights_of(net)["source"] == "random", word


def test_scores_summary_of_user_mistakes_is_a_one_line_input_error(tmp_path: Path) -> None:
    from monai_aeflow.inference.outputs import write_scores_summary

    mine = {"input": "a.nii.gz", "status": "error", "error": "a_scores.json: output exists", "user_error": True}
    ok = {"input": "b.nii.gz", "status": "ok", "error": None}
    with pytest.raises(AEFlowInputError, match="1 of 2 inputs failed: a_scores.json: output exists"):
        write_scores_summary([mine, ok], tmp_path / "s.json")
    crash = {"input": "c.nii.gz", "status": "error", "error": "RuntimeError: boom", "user_error": False}
    with pytest.raises(RuntimeError, match="2 of 3 inputs failed") as info:
        write_scores_summary([mine, ok, crash], tmp_path / "s.json")
    assert not isinstance(info.value, AEFlowInputError)
    assert write_scores_summary([ok], tmp_path / "s.json").is_file()
