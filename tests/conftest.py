"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """The folder of real scans beside the repository; skips the test when it is absent."""
    root = Path(os.environ.get("AEFLOW_SHARED_DATA", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"real data folder {root} not present")
    return root
