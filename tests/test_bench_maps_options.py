"""The command line of ``benchmarks/bench_maps.py``: encoders, spacing, cache names, defaults and the table."""

import argparse
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_maps.py"
_SPEC = importlib.util.spec_from_file_location("bench_maps_under_test", _PATH)
bench_maps = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_maps)


def test_parse_encoders_pairs_names_and_weights():
    got = bench_maps.parse_encoders("wide_resnet50_2:none, efficientnet_lite0:imagenet,resnet18")
    assert got == [("wide_resnet50_2", "none"), ("efficientnet_lite0", "imagenet"), ("resnet18", "imagenet")]


@pytest.mark.parametrize("text", ["vgg16:none", "resnet18:random", "resnet18:none,resnet18:none"])
def test_parse_encoders_rejects_bad_specs(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench_maps.parse_encoders(text)


def test_parse_spacing():
    assert [bench_maps.parse_spacing(t) for t in ("0", "none", "Native")] == [None, None, None]
    assert bench_maps.parse_spacing("1.5") == 1.5
    with pytest.raises(argparse.ArgumentTypeError):
        bench_maps.parse_spacing("-1")


def test_cache_names_differ_by_size_and_spacing():
    names = {bench_maps.cache_name("flair", "wt", size, spacing) for size in (128, 256) for spacing in (None, 1.0, 2.0)}
    assert len(names) == 6
    assert bench_maps.cache_name("t1c", "tc", 256, None) == "volumes_t1c_tc_256px_native.npz"


def test_defaults_are_the_cpu_protocol():
    args = bench_maps.parse_args([])
    assert (args.size, args.spacing, args.device, args.batch_size) == (128, 2.0, "cpu", 8)
    assert args.encoders == [("efficientnet_lite0", "imagenet")]
    args = bench_maps.parse_args(["--backbone", "resnet18", "--backbone-weights", "none", "--spacing", "none"])
    assert (args.encoders, args.spacing) == ([("resnet18", "none")], None)


def test_size_must_be_a_multiple_of_16():
    with pytest.raises(SystemExit) as err:
        bench_maps.parse_args(["--size", "100"])
    assert err.value.code == 2


@pytest.mark.parametrize("grouped", [False, True])
def test_markdown_rows_have_as_many_cells_as_the_header(grouped):
    metrics = {m: 0.5 for m in bench_maps.METRICS}
    prefix = "resnet18:none | " if grouped else ""
    rows = {"intensity": dict(metrics), f"{prefix}lr=0.001 aug=no epochs=1 | residual": dict(metrics)}
    result = {"region": "wt", "residual_mode": "positive", "folds_planned": 4, "stopped": "time limit after 2 of 4"}
    result.update(per_fold={"fold0": rows, "fold1": rows}, mean=rows)
    text = bench_maps.markdown({"modalities": {"flair": result}})
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4
    assert {line.count("|") for line in table} == {(4 if grouped else 3) + len(bench_maps.METRICS) + 2}
    assert "mean of 2 fold(s) of 4 (time limit after 2 of 4)" in text
