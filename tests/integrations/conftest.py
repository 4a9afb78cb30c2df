"""Fixtures of the integration tests: calibration tokens and inputs for the tiny models."""

import pytest
import torch


@pytest.fixture
def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
