"""Packaging and repository hygiene: every package is installed, the console script exists, lint passes."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_every_package_is_listed_in_setup_cfg():
    listed = {p.strip() for p in _setup_cfg()["options"]["packages"].split("\n") if p.strip()}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "monai_aeflow").rglob("__init__.py")} | {
        "aeflow_cli"
    }
    assert listed == found


def test_console_script_and_runtime_dependencies():
    cfg = _setup_cfg()
    assert "aeflow-cli = aeflow_cli.main:cli" in cfg["options.entry_points"]["console_scripts"]
    deps = cfg["options"]["install_requires"].lower()
    for name in ("monai", "torch", "freia", "nibabel", "itk", "torchio", "click", "tensorboard", "pytorch-ignite"):
        assert name in deps, name
    assert "torch==" not in deps.replace(" ", "")  # users are never pinned to one torch build
    assert "torchvision" not in deps and "timm" not in deps


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in readme and "test-command" in ci
    block = readme.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    assert "torch==2.13.0" in block and "pytest" in block
    assert block.index("torch==2.13.0") < block.index("pip install -e")


def test_cli_help_runs():
    exe = shutil.which("aeflow-cli")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "aeflow_cli.main", "--help"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_lint_passes():
    res = subprocess.run(["ruff", "check", "--quiet", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
