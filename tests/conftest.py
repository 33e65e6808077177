"""Shared test setup: GPU-marked tests skip where CUDA is absent; one CPU thread per test."""
import pytest
import torch

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


def _cpu_takes_row_scales() -> bool:
    """Whether this torch's CPU ``torch._scaled_mm`` takes per-row scales (torch 2.13's does; 2.11's asserts
    that both scales are single numbers)."""
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


_CPU_ROW_SCALES = _cpu_takes_row_scales()


@pytest.fixture
def cpu_row_scales():
    """For a test that runs a Hopper plan's per-row FP8 GEMMs on the CPU: skips where this torch's CPU
    ``torch._scaled_mm`` cannot run them."""
    if not _CPU_ROW_SCALES:
        pytest.skip("this torch's CPU torch._scaled_mm takes only per-tensor scales (per-row ones: torch 2.13)")


@pytest.fixture(params=_devices())
def device(request):
    """Runs a test on the CPU and, marked `gpu`, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs with one torch thread. The tests' tensors are small, so a second thread
    costs more in synchronization than it computes (the CPU suite on 2 cores: 60 s with one thread,
    66 s with two); and on a shared machine, threads that compete with another process's threads
    for the same cores spin at every parallel region, which made single tests 10-30x slower."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(_DEFAULT_THREADS)
