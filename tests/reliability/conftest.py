"""Shared fixtures of the reliability suite: a tiny synthetic PNG data folder, a tiny model config, a
helper that runs ``python -m oasisvq`` as a real process, and a session-wide trained run with a prior."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 32
PYTHON = sys.executable
SRC = Path(__file__).resolve().parents[2] / "src"

# A model small enough that a step takes milliseconds on one CPU thread.
TINY_CONFIG = {
    "model": {"downsample": 4, "channels": [8, 8], "hidden": 8, "res_blocks": 1, "num_codes": 16, "code_dim": 4},
    "train": {"batch_size": 4, "evals_per_epoch": 2, "warmup_steps": 2, "val_slices": 8, "device": "cpu",
              "seed": 3},
}


def ellipse(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    a, b = rng.uniform(0.4, 0.85, 2)
    r = ((xx - rng.uniform(-0.1, 0.1)) / a) ** 2 + ((yy - rng.uniform(-0.1, 0.1)) / b) ** 2
    img = 90 * (r < 1) + 70 * (r < 0.45) + 60 * (r < 0.15) + rng.normal(0, 4, r.shape) * (r < 1)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pngs(root: Path, counts=(24, 8, 8), seed: int = 0) -> Path:
    """train/validate/test folders of ellipse slices named case_<subject>_slice_<k>.png."""
    rng = np.random.default_rng(seed)
    i = 0
    for split, n in zip(("train", "validate", "test"), counts):
        (root / split).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            Image.fromarray(ellipse(rng)).save(root / split / f"case_{i // 2:03d}_slice_{i % 2}.png")
            i += 1
    return root


def env(cache: Path | None = None) -> dict[str, str]:
    """The environment of a child process: one thread (deterministic, polite to a busy machine)."""
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}"
              f"{e.get('PYTHONPATH', '')}", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
    if cache is not None:
        e["OASISVQ_CACHE"] = str(cache)
    return e


def oasisvq(*args, cache: Path | None = None, timeout: float = 120, check: bool = False
            ) -> subprocess.CompletedProcess:
    """Run ``python -m oasisvq ARGS`` as a child process and return what it did."""
    p = subprocess.run([PYTHON, "-m", "oasisvq", *map(str, args)], check=False, capture_output=True, text=True,
                       env=env(cache), timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"oasisvq {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def popen(*args, cache: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "oasisvq", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(cache))


def error_line(stderr: str) -> str:
    """The single ``oasisvq: error:`` line of a failed command (asserting there is exactly one line)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    assert lines[0].startswith("oasisvq: error:"), lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return write_pngs(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def rel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.json"
    p.write_text(json.dumps(TINY_CONFIG))
    return p


def train_args(data: Path, out: Path, config: Path, epochs: int = 2, *extra) -> list:
    return ["train", "--data", data, "--out", out, "--config", config, "--epochs", epochs, "--size", SIZE,
            "--no-progress", *extra]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir, tiny_config, rel_cache) -> Path:
    """A finished one-epoch VQ-VAE run with a tiny transformer prior (trained in-process, once)."""
    import torch

    from oasisvq.config import RunConfig
    from oasisvq.prior import train_prior
    from oasisvq.tokenizer import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = RunConfig.from_dict(TINY_CONFIG)
    cfg.data.paths, cfg.data.size, cfg.train.epochs = [str(data_dir)], SIZE, 1
    train(cfg, out, cache_dir=rel_cache, progress=False)
    train_prior(out, "transformer", epochs=1, cache_dir=rel_cache, progress=False, layers=1, width=8, heads=2,
                batch_size=8, num_classes=0)  # unconditional, although the slices carry levels
    return out
