"""Running the MONAI bundles in tests the way a MONAI user runs them: ``python -m monai.bundle ...`` in a
subprocess, on the tiny synthetic data the bundles generate themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TIMEOUT = 600

BRAIN_TINY = [
    "--synthetic_cohort#n_healthy", "4",
    "--synthetic_cohort#n_lesion", "4",
    "--synthetic_cohort#shape", "[32, 32, 24]",
    "--synthetic_cohort#spacing", "[6.0, 6.0, 5.0]",
    "--image_size", "[32, 32]",
    "--split_fractions", "[0.5, 0.25, 0.25]",
    "--batch_size", "8",
    "--max_epochs", "1",
    "--flow_init", "16",
]  # fmt: skip
"""The brain bundle on 4 healthy and 4 lesioned 32 x 32 x 24 subjects, one epoch."""

IMAGES_TINY_DATA = [
    "--synthetic_images#n_healthy", "4",
    "--synthetic_images#n_lesion", "4",
    "--synthetic_images#shape", "[32, 32, 24]",
    "--synthetic_images#spacing", "[6.0, 6.0, 5.0]",
    "--synthetic_images#min_lesion_pixels", "4",
    "--image_size", "[32, 32]",
    "--split_fractions", "[0.5, 0.25, 0.25]",
    "--batch_size", "8",
]  # fmt: skip
"""The 2D-images bundle's tiny synthetic data and batch (the training length is the test's)."""


def bundle_env() -> dict[str, str]:
    """The environment of a bundle subprocess: one thread, no warnings in the captured output."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def run_checked(cmd: list[str], cwd: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd``; fail the test with the command and the ends of its output unless it exits 0."""
    res = subprocess.run(cmd, cwd=cwd, env=bundle_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


def run_bundle(bundle: Path, args: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in the bundle's folder (see :func:`run_checked`)."""
    return run_checked([sys.executable, "-m", "monai.bundle", *args], bundle, timeout)
