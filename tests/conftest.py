"""Shared test setup: GPU-marked tests skip where CUDA is absent; CPU threads for the free cores."""
import pytest
import torch

from experiments.build import resolve_threads

_DEFAULT_THREADS = torch.get_num_threads()


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


@pytest.fixture(autouse=True)
def _threads_for_free_cores():
    """Each test runs with one torch thread per core that other processes leave free (the rule of
    train.threads=auto): on a shared machine, threads competing with another process's threads for
    the same cores spin at every parallel region, and a test then takes 10-30x longer."""
    torch.set_num_threads(_DEFAULT_THREADS)
    torch.set_num_threads(resolve_threads("auto"))
    yield
    torch.set_num_threads(_DEFAULT_THREADS)
