"""Shared test setup: GPU-marked tests skip where CUDA is absent."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _devices():
    devs = ["cpu"]
    devs.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return devs


@pytest.fixture(params=_devices())
def device(request):
    """Runs a test on the CPU and, marked `gpu`, on CUDA."""
    return torch.device(request.param)
