import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("OASISVQ_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module, for tests that call its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared(sub: str) -> Path:
    """A folder of the real OASIS data beside the checkout; skips the test where it is absent."""
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"real OASIS data not found at {p} (set OASISVQ_SHARED_DATA to its folder)")
    return p


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two contended ones (measured 100x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
