"""Sample folders side by side, level by level, under a row of real held-out slices at the same levels:
for each of ``--levels`` the real slice of the split's first subject nearest it, and from each folder (as
written by ``oasisvq sample --level``) the sample drawn nearest it. A figure to compare priors by eye.

    python benchmarks/sample_rows.py RUN SAMPLES [SAMPLES ...] --out FIGURE.png [--labels L ...] [--split test]

RUN names the data (its config); the samples need not come from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from oasisvq import data, figures
from oasisvq.config import RunConfig
from oasisvq.download import OASIS_CREDIT


def nearest_samples(folder: Path, levels: list[float]) -> tuple[np.ndarray, list[float]]:
    """The sample drawn nearest each level (uint8, N x H x W) and the levels they were drawn at."""
    info = json.loads((folder / "samples.json").read_text())
    drawn = info.get("levels")
    if not drawn:
        raise SystemExit(f"{folder}: its samples carry no levels (sample with --level)")
    drawn = np.asarray(drawn)
    pick = [int(np.argmin(np.abs(drawn - lv))) for lv in levels]
    images = np.stack([np.asarray(Image.open(folder / info["files"][i]).convert("L")) for i in pick])
    return images, [float(drawn[i]) for i in pick]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="run whose data config gives the real slices")
    ap.add_argument("samples", nargs="+", type=Path, help="folders written by `oasisvq sample`")
    ap.add_argument("--out", type=Path, required=True, help="figure (PNG)")
    ap.add_argument("--labels", nargs="+", help="one row title per samples folder (default: its name)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--levels", nargs="+", type=float, default=[0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85])
    a = ap.parse_args(argv)
    labels = a.labels or [p.name for p in a.samples]
    if len(labels) != len(a.samples):
        ap.error(f"--labels needs one title per samples folder ({len(a.samples)}), got {len(labels)}")
    cfg = RunConfig.load(a.run / "config.json")
    held = data.load_slices(cfg.data, None, progress=False).split(a.split)
    pick = held.nearest_levels(a.levels)
    rows, titles = [held.uint8(pick)], [f"real, level {held.position[i]:.2f}" for i in pick]
    for folder, label in zip(a.samples, labels, strict=True):
        images, drawn = nearest_samples(folder, a.levels)
        rows.append(images)
        titles += [f"{label}, {lv:.2f}" for lv in drawn]
    figures.slice_grid(np.concatenate(rows), a.out, titles=titles, cols=len(a.levels),
                       title=f"samples beside real slices of the {a.split} subject, by level",
                       footer=f"Real slices: {OASIS_CREDIT}")
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
