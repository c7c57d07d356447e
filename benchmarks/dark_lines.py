"""The sulci as a number: the share of the inner head on thin dark lines (``evaluate-samples``' anatomy
``dark_lines``) for real held-out slices, training slices, the held-out slices blurred without learning
(down-f-up), the same slices through each run's tokeniser, and sample folders. Says how much of the real
slices' line structure a tokeniser keeps and a prior draws. ``--upsampled RUN`` adds the held-out slices'
own layouts (through the coarse run of RUN's upsampler) with the fine codes drawn by that upsampler: how
much of the samples' shortfall is the upsampler's, with the layout prior's part taken out.

    python benchmarks/dark_lines.py --runs RUN [RUN ...] [--samples DIR ...] [--upsampled RUN ...] [--split test]
        [--figure PNG]

The first run names the data. Prints one row per set: slices, mean share, quartiles. ``--figure`` puts
held-out slices and the first samples folder's slices (nearest in level) above their dark-line maps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oasisvq import data, figures
from oasisvq.config import RunConfig
from oasisvq.download import OASIS_CREDIT
from oasisvq.evaluation.generation import (
    DARK_LINE_THRESHOLD,
    dark_line_map,
    dark_lines,
    inner_head,
    read_sample_pngs,
    sample_levels,
)
from oasisvq.evaluation.reconstruction import encode_decode
from oasisvq.prior import decode_uint8, load_prior
from oasisvq.tokenizer import load_model

N_REAL, FIGURE_COLUMNS = 64, 4


def down_up(images: np.ndarray, factor: int) -> np.ndarray:
    """Area-downsampled by ``factor`` and bilinearly back: the blur of a grid that keeps no detail."""
    x = torch.from_numpy(images)[:, None]
    small = F.avg_pool2d(x, factor)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()


def row(name: str, images: np.ndarray) -> np.ndarray:
    share = np.array([dark_lines(img) for img in images])
    q1, q2, q3 = np.quantile(share, [0.25, 0.5, 0.75])
    print(f"| {name} | {len(images)} | {share.mean():.3f} | {q1:.3f} / {q2:.3f} / {q3:.3f} |", flush=True)
    return share


@torch.no_grad()
def upsampled_real_layouts(run: Path, real: np.ndarray, seed: int = 1, batch: int = 16) -> np.ndarray:
    """``real`` slices (N, H, W) in [0, 1] through the coarse VQ-VAE of ``run``'s upsampler (the layout it
    reads), fine codes drawn by the upsampler in its own passes, decoded by ``run``'s VQ-VAE."""
    prior, meta = load_prior(run, "upsampler", "best", torch.device("cpu"))
    coarse, _ = load_model(meta["prior_config"]["coarse_run"], "best")
    fine, _ = load_model(run, "best")
    gen, out = torch.Generator().manual_seed(seed), []
    for b in range(0, len(real), batch):
        x = torch.from_numpy(real[b:b + batch])[:, None]
        layout = decode_uint8(coarse, coarse.encode(x))
        codes = prior.sample(len(x), tuple(meta["grid"]), generator=gen, cond=layout)
        out.append(decode_uint8(fine, codes)[:, 0].numpy())
    return np.concatenate(out).astype(np.float32) / 255


def line_picture(img: np.ndarray) -> np.ndarray:
    """The dark-line map inside the inner head, scaled so the counting threshold is mid-grey."""
    return np.clip(dark_line_map(img) / (2 * DARK_LINE_THRESHOLD), 0, 1) * inner_head(img)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, required=True, help="tokeniser runs (the first names the data)")
    ap.add_argument("--samples", nargs="*", type=Path, default=[], help="folders written by `oasisvq sample`")
    ap.add_argument("--upsampled", nargs="*", type=Path, default=[],
                    help="runs with an upsampler: the held-out slices' real layouts, upsampled by it")
    ap.add_argument("--split", default="test", help="held-out split (default: test)")
    ap.add_argument("--figure", type=Path, help="PNG: real and sampled slices above their dark-line maps")
    a = ap.parse_args(argv)
    slices = data.load_slices(RunConfig.load(a.runs[0] / "config.json").data, None, progress=False)
    held, train = slices.split(a.split), slices.split("train")
    pick = np.sort(np.random.default_rng(0).permutation(len(held))[:N_REAL])
    real = held.uint8(pick).astype(np.float32) / 255
    print(f"| set ({a.split} split unless named) | slices | mean dark-line share | quartiles |\n|---|---|---|---|")
    row("real held-out", real)
    row("real training", train.uint8(np.sort(np.random.default_rng(1).permutation(len(train))[:N_REAL])) / 255)
    for f in (4, 8, 16):
        row(f"held-out down-{f}x-up (no learning)", down_up(real, f))
    for run in a.runs:
        model, _ = load_model(run, "best")
        row(f"held-out through {run}", np.clip(encode_decode(model, real, torch.device("cpu"), batch=16), 0, 1))
    for run in a.upsampled:
        row(f"held-out real layout, upsampled by {run}", upsampled_real_layouts(run, real))
    drawn = []
    for folder in a.samples:
        images, info = read_sample_pngs(folder)
        drawn.append((images.astype(np.float32) / 255, sample_levels(info, len(images))))
        row(f"samples {folder}", drawn[-1][0])
    if a.figure:
        real_levels = held.position[pick]
        if drawn and drawn[0][1] is not None:
            shown, levels = drawn[0][0][:FIGURE_COLUMNS], drawn[0][1][:FIGURE_COLUMNS]
            near = [int(np.argmin(np.abs(real_levels - lv))) for lv in levels]
        else:
            shown, near = drawn[0][0][:FIGURE_COLUMNS] if drawn else real[:0], list(range(FIGURE_COLUMNS))
        top = np.concatenate([real[near], shown])
        titles = [f"real {real_levels[i]:.2f}: {dark_lines(real[i]):.2f}" for i in near]
        titles += [f"sample: {dark_lines(s):.2f}" for s in shown]
        pictures = np.concatenate([top, np.stack([line_picture(x) for x in top])])
        figures.slice_grid(pictures, a.figure, titles=titles + ["dark lines"] * len(top), cols=len(top),
                           title="slices above their dark-line maps (inner head; title: share on lines)",
                           footer=f"Real slices: {OASIS_CREDIT}")
        print(f"written {a.figure}")


if __name__ == "__main__":
    main()
