"""Shared test fixtures: the reference fixture files and the tiny weights."""

from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"
REFERENCE_WEIGHTS = REFERENCE / "weights"
EXPECTED = REFERENCE / "expected"

# The reference outputs were computed with 2 CPU threads; other counts change the last bits.
torch.set_num_threads(2)


def expected(name):
    """The reference implementation's arrays for one check (tests/fixtures/reference/README.md)."""
    with np.load(EXPECTED / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def tiny_weights() -> Path:
    """Tiny random weights in the published layout (read-only: copy before changing anything)."""
    return REFERENCE_WEIGHTS
