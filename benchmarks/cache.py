"""Slice-cache read throughput: random training batches of 256x256 slices from the uint8 memory map.

    python benchmarks/cache.py [--data ../shared/data/oasis1_mni_volumes] [--batch-size 64] [--seconds 5]

Prints slices/s for uint8 batches and for float tensors in [0, 1] (what training consumes), after a
cold build of the cache and after one warm-up pass. Target: >= 5,000 slices/s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oasisvq.config import DataConfig
from oasisvq.data import load_slices

DATA = Path(os.environ.get("OASISVQ_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def rate(fn, n_per_call: int, seconds: float) -> float:
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    return calls * n_per_call / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA / "oasis1_mni_volumes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    if not a.data.exists():
        raise SystemExit(f"benchmark skipped: {a.data} not found (set OASISVQ_SHARED_DATA)")
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        load_slices(DataConfig(paths=[str(a.data)]), cache_dir=cache, progress=False)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        ss = load_slices(DataConfig(paths=[str(a.data)]), cache_dir=cache, progress=False)
        reopen = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        n = len(ss)
        ss.uint8(np.arange(n))  # warm the page cache, as every epoch after the first sees it
        u8 = rate(lambda: ss.uint8(rng.integers(0, n, a.batch_size)), a.batch_size, a.seconds)
        fl = rate(lambda: ss.tensor(rng.integers(0, n, a.batch_size)), a.batch_size, a.seconds)
    print(f"data: {a.data} ({n} slices of {ss.shape[0]}x{ss.shape[1]}), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    print("| step | result |\n|---|---|")
    print(f"| first load (decode, slice, write cache) | {build:.1f} s |")
    print(f"| later load (open memory map + index) | {reopen * 1000:.0f} ms |")
    print(f"| random batches of {a.batch_size}, uint8 | {u8:,.0f} slices/s |")
    print(f"| random batches of {a.batch_size}, float tensor in [0, 1] | {fl:,.0f} slices/s |")
    print(f"target >= 5,000 slices/s: {'met' if fl >= 5000 else 'NOT met'}")


if __name__ == "__main__":
    main()
