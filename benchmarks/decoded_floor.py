"""The decoded floor of tokenisers, without a prior: training-subject slices through each run's VQ-VAE,
measured against the held-out slices like samples (``oasisvq evaluate-samples``' decoded floor, on several
seeded floor sets). What a perfect prior over a run's codes would score; judges a tokeniser change in
minutes.

    python benchmarks/decoded_floor.py --split validate RUN [RUN ...]

Prints, per floor set (64 training slices, seeds 1 to 3): the floor itself, then each run's decoded floor:
two-sample accuracy on all features and on each feature group alone, precision and recall. All runs must
read the same slices (the first run's data settings are used).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from oasisvq import data
from oasisvq.config import RunConfig
from oasisvq.evaluation.generation import FEATURE_GROUPS, compare, features, standardize
from oasisvq.evaluation.reconstruction import encode_decode
from oasisvq.tokenizer import load_model

SEEDS, N_FLOOR, MAX_REAL = (1, 2, 3), 64, 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--split", default="validate", help="held-out split to compare with (default: validate)")
    a = ap.parse_args(argv)
    slices = data.load_slices(RunConfig.load(a.runs[0] / "config.json").data, None, progress=False)
    held, train = slices.split(a.split), slices.split("train")
    raw_real = features(held.uint8(np.sort(np.random.default_rng(0).permutation(len(held))[:MAX_REAL])))
    floors = {s: train.uint8(np.sort(np.random.default_rng(s).choice(len(train), N_FLOOR, replace=False)))
              for s in SEEDS}

    def show(name: str, imgs: np.ndarray) -> None:
        f_r, f_x = standardize(raw_real, raw_real, features(imgs))[1:]
        c = compare(f_x, f_r)
        groups = "  ".join(f"{g} {c['two_sample_' + g]:.2f}" for g in FEATURE_GROUPS)
        print(f"{name:48s} two-sample {c['two_sample_accuracy']:.3f} ({groups})  precision {c['precision']:.2f}"
              f"  recall {c['recall']:.2f}", flush=True)

    for s, imgs in floors.items():
        show(f"floor, seed {s}", imgs)
    for run in a.runs:
        model, _ = load_model(run, "best")
        for s, imgs in floors.items():
            rec = encode_decode(model, imgs.astype(np.float32) / 255, torch.device("cpu"), batch=16)
            show(f"{run} decoded, seed {s}", np.rint(np.clip(rec, 0, 1) * 255).astype(np.uint8))


if __name__ == "__main__":
    main()
