from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

try:  # property-based tests (tests/*/test_*_properties.py); hypothesis is in the "test" extra
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    pass
else:
    # "ci" (the default): few examples, derandomized (the same examples every run, no example database), so the suite
    # is fast and reproducible; "thorough": many random examples, for a hunt (pytest --hypothesis-profile=thorough).
    settings.register_profile(
        "ci",
        max_examples=50,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile("ci")  # --hypothesis-profile (hypothesis' pytest plugin) overrides this


def pytest_addoption(parser):
    parser.addoption("--accelerator", default="cpu", help="accelerator for model tests: cpu, gpu or auto")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread for the whole run (restored after).

    The test models are tiny: with 2 threads on 2 shared cores torch's workers spin against each other and a test
    takes ~15x the CPU time (10 epochs of a FlowMatching test: 10.4 CPU s at 2 threads, 0.64 s at 1).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def accelerator(request) -> str:
    return request.config.getoption("--accelerator")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DATA}; tests expect ../shared/data beside the clone")
    return SHARED_DATA


@pytest.fixture(scope="session")
def kang_path(shared_data) -> Path:
    return shared_data / "kang2018_pbmc_ifnb_small.h5ad"


@pytest.fixture(scope="session")
def papalexi_path(shared_data) -> Path:
    return shared_data / "papalexi2021_eccite_thp1_rna299_sceptre.h5ad"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
