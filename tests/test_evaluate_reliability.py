"""``aeflow-cli evaluate``: an existing report is never replaced silently, and multi-valued labels are reported.

- A folder that already holds a report is refused up front (one line, exit 2, nothing touched) unless
  ``--overwrite`` is given; then the report is replaced, stale report files included.
- Labels with values other than 0 and 1 (BraTS: 0, 1, 2, 4) are binarised as ``label > 0`` with a warning
  naming the file, once per file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import monai_aeflow.evaluation as evaluation
from aeflow_cli.evaluate import evaluate
from monai_aeflow.evaluation import EvaluationConfig, evaluate_maps, find_cases, load_case

FAST = ["--bootstrap", "0", "--grid-size", "128", "-q"]
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (24, 24, 6)


def _write_split(root: Path, seeds, brats_labels: bool = False) -> Path:
    """Maps, labels (0/1, or BraTS-like 0/1/2/4 with the same lesion support) and brain masks."""
    for sub in ("maps", "labels", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        mask = np.zeros(SHAPE, np.uint8)
        mask[2:22, 2:22, 1:5] = 1
        lesion = np.zeros(SHAPE, bool)
        x, y = rng.integers(6, 14, 2)
        lesion[x : x + 5, y : y + 5, 2:4] = True
        label = lesion.astype(np.uint8)
        if brats_labels:  # necrosis 1, oedema 2, enhancing tumour 4 inside the same lesion
            label = np.where(lesion, rng.choice(np.array([1, 2, 4], np.uint8), SHAPE), 0).astype(np.uint8)
        residual = (rng.gamma(2.0, 0.05, SHAPE) + 0.5 * lesion) * mask
        name = f"sub{seed:02d}.nii.gz"
        nib.save(nib.Nifti1Image(residual.astype(np.float32), AFFINE), root / "maps" / name)
        nib.save(nib.Nifti1Image(label, AFFINE), root / "labels" / name)
        nib.save(nib.Nifti1Image(mask, AFFINE), root / "masks" / name)
    return root


@pytest.fixture
def splits(tmp_path):
    return _write_split(tmp_path / "val", [1, 2]), _write_split(tmp_path / "test", [11, 12, 13])


def _assert_user_error(res, *fragments):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err, err
    for f in fragments:
        assert f in err, err


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# -- B: an existing report folder ---------------------------------------------------------------------------


def test_existing_report_is_refused_up_front_without_overwrite(splits, tmp_path, monkeypatch):
    val, test = splits
    out = tmp_path / "report"
    args = ["--val", str(val), "--test", str(test), "-o", str(out), *FAST]
    first = CliRunner().invoke(evaluate, [*args, "--no-plots"])
    assert first.exit_code == 0, first.output
    before = _snapshot(out)
    assert "metrics.json" in before

    def never(*a, **k):
        raise AssertionError("the evaluation ran although the report folder was refused")

    monkeypatch.setattr(evaluation, "evaluate_maps", never)
    monkeypatch.setattr(evaluation, "find_cases", never)
    again = CliRunner().invoke(evaluate, [*args, "--threshold", "0.3"])
    _assert_user_error(again, str(out), "--overwrite")
    assert _snapshot(out) == before  # nothing replaced, nothing added


def test_overwrite_replaces_the_report(splits, tmp_path):
    val, test = splits
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a report file: kept
    base = ["--val", str(val), "--test", str(test), "-o", str(out), *FAST]
    first = CliRunner().invoke(evaluate, base)  # an existing folder without a report is fine
    assert first.exit_code == 0, first.output
    assert (out / "roc_pr.png").exists()
    old = json.loads((out / "metrics.json").read_text())
    res = CliRunner().invoke(evaluate, [*base, "--threshold", "0.3", "--no-plots", "--overwrite"])
    assert res.exit_code == 0, res.output
    new = json.loads((out / "metrics.json").read_text())
    assert new["protocol"]["threshold"]["value"] == 0.3 != old["protocol"]["threshold"]["value"]
    assert not list(out.glob("*.png"))  # the plots of the replaced report are gone
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob(".*"))


def test_empty_existing_folder_is_fine_and_a_file_is_refused(splits, tmp_path, monkeypatch):
    val, test = splits
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(evaluate, ["--val", str(val), "--test", str(test), "-o", str(empty), "--no-plots", *FAST])
    assert res.exit_code == 0, res.output
    assert (empty / "metrics.json").exists()

    def never(*a, **k):
        raise AssertionError("the evaluation ran although the output is a file")

    monkeypatch.setattr(evaluation, "evaluate_maps", never)
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep")
    res = CliRunner().invoke(evaluate, ["--val", str(val), "--test", str(test), "-o", str(a_file), *FAST])
    assert res.exit_code == 2 and "Traceback" not in res.output and "is a file" in res.output, res.output
    assert a_file.read_text() == "keep"


# -- C: labels with values other than 0 and 1 ---------------------------------------------------------------


def _label_warning() -> type[Warning]:
    from monai_aeflow.evaluation.io import LabelValuesWarning

    return LabelValuesWarning


def test_multi_valued_label_warns_naming_the_file(tmp_path):
    split = _write_split(tmp_path / "brats", [5], brats_labels=True)
    case = find_cases(split / "maps", split / "labels", split / "masks")[0]
    raw = np.asarray(nib.load(case["label"]).dataobj)
    assert set(np.unique(raw)) == {0, 1, 2, 4}
    with pytest.warns(_label_warning(), match="sub05") as record:
        arrays = load_case(case)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(case["label"]) in message and "label > 0" in message and "\n" not in message
    # evaluation proceeds with label > 0
    np.testing.assert_array_equal(
        arrays["label"], np.asarray(nib.as_closest_canonical(nib.load(case["label"])).dataobj) > 0
    )


def test_binary_labels_do_not_warn(tmp_path):
    split = _write_split(tmp_path / "plain", [6])
    case = find_cases(split / "maps", split / "labels", split / "masks")[0]
    float_label = tmp_path / "float_label.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(case["label"]).dataobj).astype(np.float32), AFFINE), float_label)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_case(case)
        load_case({**case, "label": float_label})
        load_case({"map": np.zeros((4, 4)), "label": np.eye(4, dtype=bool)})


def test_array_label_warning_names_the_case():
    with pytest.warns(_label_warning(), match="'arr'"):
        load_case({"name": "arr", "map": np.zeros((4, 4)), "label": np.diag([0, 1, 2, 4])})


def test_one_warning_per_file_and_same_metrics_as_binarised_labels(tmp_path):
    val = _write_split(tmp_path / "val", [1, 2], brats_labels=True)
    test = _write_split(tmp_path / "test", [11, 12], brats_labels=True)
    config = EvaluationConfig(n_bootstrap=0, n_thresholds=128)
    # test images are read again for the figure of cases: still one warning per file
    test_cases = find_cases(test / "maps", test / "labels", test / "masks", test / "maps")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = evaluate_maps(find_cases(val / "maps", val / "labels", val / "masks"), test_cases, config)
    messages = [str(w.message) for w in record if issubclass(w.category, _label_warning())]
    files = [str(p / "labels" / f"sub{s:02d}.nii.gz") for p, seeds in ((val, (1, 2)), (test, (11, 12))) for s in seeds]
    assert sorted(next(f for f in files if f in m) for m in messages) == sorted(files), messages
    assert len(messages) == len(files)
    # the same volumes with 0/1 labels give the same metrics
    for split in (val, test):
        for path in (split / "labels").iterdir():
            img = nib.load(path)
            nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", _label_warning())
        binary = evaluate_maps(find_cases(val / "maps", val / "labels", val / "masks"), test_cases, config)
    for metric in ("dice_pooled", "dice_mean", "auroc", "auprc"):
        assert result["metrics"]["pixel"][metric]["value"] == binary["metrics"]["pixel"][metric]["value"], metric
    assert result["protocol"]["threshold"]["value"] == binary["protocol"]["threshold"]["value"]


def test_cli_prints_one_warning_line_per_file(tmp_path):
    val = _write_split(tmp_path / "val", [1, 2])
    test = _write_split(tmp_path / "test", [11, 12, 13], brats_labels=True)
    out = tmp_path / "report"
    args = ["--val", str(val), "--test", str(test), "--test-images", str(test / "maps"), "-o", str(out), *FAST]
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("Warning:")]
    names = [f"sub{s}.nii.gz" for s in (11, 12, 13)]
    assert len(lines) == 3, res.stderr
    assert sorted(next(n for n in names if n in line) for line in lines) == names
    assert all("label > 0" in line for line in lines)
    assert "Traceback" not in res.output and "warnings.warn" not in res.stderr
    assert json.loads((out / "metrics.json").read_text())["metrics"]["pixel"]["dice_pooled"]["value"] > 0.5
