import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_cpu_fallback():
    """The once-per-process 'no GPU, running on CPU' warning is tested on its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="hetmem: no CUDA or ROCm GPU found")
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
