"""``aeflow-cli score --resume``: going on with a killed or extended run over many inputs.

Complete outputs written with the same model file, threshold and post-processing are kept byte for byte (their
summary rows read back from their scores JSON), the other inputs are scored, and ``summary.csv`` lists all of
them; outputs that differ from what the run would write are refused per input, exit code 2, nothing touched.
The model is the session fixture ``small_volume_model`` (conftest.py).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from aeflow_cli.main import cli
from monai_aeflow.inference.pipeline import output_name


def _run(*args: str):
    return CliRunner().invoke(cli, ["score", *args, "--device", "cpu", "--quiet", "--no-preview"])


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time (ns)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def _summary(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "summary.csv", newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


@pytest.fixture
def three_inputs(small_volume_model, tmp_path) -> list[str]:
    """Three volumes copied into a folder of their own (their modification times are this test's)."""
    src = [small_volume_model["lesioned"][0], small_volume_model["lesioned"][1], small_volume_model["healthy"][0]]
    folder = tmp_path / "inputs"
    folder.mkdir()
    out = []
    for r in src:
        dest = folder / Path(r["image"]).name
        shutil.copyfile(r["image"], dest)
        out.append(str(dest))
    return out


def test_resume_keeps_complete_outputs_and_scores_the_rest(small_volume_model, three_inputs, tmp_path):
    model = str(small_volume_model["model"])
    out = tmp_path / "out"
    first = _run(*three_inputs[:2], "-m", model, "-o", str(out))
    assert first.exit_code == 0, first.output
    kept_name = output_name(three_inputs[0])
    # a run killed after the first input: the second input's group and summary.csv are gone
    for p in out.glob(f"{output_name(three_inputs[1])}_*"):
        p.unlink()
    before = _snapshot(out)

    plain = _run(*three_inputs, "-m", model, "-o", str(out))  # without --resume: the summary.csv is refused
    assert plain.exit_code == 2 and "--overwrite" in plain.output

    result = CliRunner().invoke(
        cli, ["score", *three_inputs, "-m", model, "-o", str(out), "--device", "cpu", "--no-preview", "--resume"]
    )
    assert result.exit_code == 0, result.output
    assert "1 of 3 inputs kept their outputs from an earlier run (--resume)" in result.output
    after = _snapshot(out)
    for name, (data, mtime) in before.items():  # the kept group is untouched, byte for byte and in time
        if name.startswith(kept_name):
            assert after[name] == (data, mtime), name
    rows = _summary(out)
    assert set(rows) == {output_name(p) for p in three_inputs}
    assert all(r["status"] == "ok" for r in rows.values())
    for p in three_inputs:  # every row agrees with its scores JSON, kept or new
        scores = json.loads((out / f"{output_name(p)}_scores.json").read_text())
        assert float(rows[output_name(p)]["volume_score"]) == pytest.approx(scores["volume_score"], rel=1e-9)
        assert int(rows[output_name(p)]["lesion_voxels"]) == scores["lesion_voxels"]

    # everything complete: a second resume scores nothing and rewrites only summary.csv
    again = _snapshot(out)
    result = _run(*three_inputs, "-m", model, "-o", str(out), "--resume")
    assert result.exit_code == 0, result.output
    final = _snapshot(out)
    assert {k: v for k, v in final.items() if k != "summary.csv"} == {
        k: v for k, v in again.items() if k != "summary.csv"
    }

    def without_seconds(table):
        return {k: {c: v for c, v in r.items() if c != "seconds"} for k, r in table.items()}

    assert without_seconds(_summary(out)) == without_seconds(rows)


def test_resume_refuses_outputs_of_another_threshold(small_volume_model, three_inputs, tmp_path):
    model = str(small_volume_model["model"])
    out = tmp_path / "out"
    assert _run(three_inputs[0], "-m", model, "-o", str(out)).exit_code == 0
    before = _snapshot(out)
    low = small_volume_model["threshold"] / 3
    result = _run(*three_inputs[:2], "-m", model, "-o", str(out), "--resume", "--threshold", str(low))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    scores_file = str(out / f"{output_name(three_inputs[0])}_scores.json")
    assert scores_file in errors[0] and "threshold" in errors[0] and "--overwrite" in errors[0], errors[0]
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the first group replaced
    # the other input was scored, and summary.csv records the refusal
    rows = _summary(out)
    assert rows[output_name(three_inputs[0])]["status"] == "error"
    assert rows[output_name(three_inputs[1])]["status"] == "ok"


def test_resume_refuses_a_group_whose_files_changed_or_whose_input_changed(small_volume_model, three_inputs, tmp_path):
    model = str(small_volume_model["model"])
    out = tmp_path / "out"
    assert _run(three_inputs[0], "-m", model, "-o", str(out)).exit_code == 0
    name = output_name(three_inputs[0])
    mask = out / f"{name}_mask.nii.gz"
    mask.write_bytes(mask.read_bytes()[:-10])  # truncated after it was written
    result = _run(three_inputs[0], "-m", model, "-o", str(out), "--resume")
    assert result.exit_code == 2 and "missing or has another size" in result.output, result.output

    out2 = tmp_path / "out2"
    assert _run(three_inputs[0], "-m", model, "-o", str(out2)).exit_code == 0
    scores = out2 / f"{name}_scores.json"
    later = scores.stat().st_mtime + 5
    os.utime(three_inputs[0], (later, later))  # the input was replaced after it was scored
    result = _run(three_inputs[0], "-m", model, "-o", str(out2), "--resume")
    assert result.exit_code == 2 and "modified since it was scored" in result.output, result.output


def test_resume_refuses_outputs_of_another_model_file(small_volume_model, three_inputs, tmp_path):
    model = tmp_path / "other.pt"
    shutil.copyfile(small_volume_model["model"], model)
    out = tmp_path / "out"
    assert _run(three_inputs[0], "-m", str(small_volume_model["model"]), "-o", str(out)).exit_code == 0
    with open(model, "ab") as f:  # another file (the SHA-256 differs); torch.load ignores trailing bytes
        f.write(b"\0" * 8)
    result = _run(three_inputs[0], "-m", str(model), "-o", str(out), "--resume")
    assert result.exit_code == 2 and "another model file" in result.output, result.output


def test_resume_and_overwrite_together_are_refused(small_volume_model, three_inputs, tmp_path):
    out = tmp_path / "out"
    result = _run(three_inputs[0], "-m", str(small_volume_model["model"]), "-o", str(out), "--resume", "--overwrite")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--resume" in result.output and "--overwrite" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_score_paths_resume_rows(small_volume_model, three_inputs, tmp_path):
    from monai_aeflow.inference import AnomalyScorer, score_paths

    scorer = AnomalyScorer(small_volume_model["model"], device="cpu")
    out = tmp_path / "out"
    first = score_paths(scorer, three_inputs[:1], out, preview=False, workers=0, progress=False)
    rows = score_paths(scorer, three_inputs[:2], out, preview=False, workers=0, progress=False, resume=True)
    assert [r["resumed"] for r in rows] == [True, False]
    assert rows[0]["volume_score"] == first[0]["volume_score"]
    assert rows[0]["lesion_voxels"] == first[0]["lesion_voxels"]
    assert rows[0]["outputs"] == first[0]["outputs"]
