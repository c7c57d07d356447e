"""What an upsampler draws given a perfect layout: held-out real slices through the coarse run's VQ-VAE
(the blurred image the upsampler reads), then fine codes drawn by each run's upsampler and decoded. Beside
them the real slice and the fine run's own reconstruction (what the upsampler should learn to draw).
Separates the upsampler's share of the samples' look from the coarse prior's.

    python benchmarks/upsampler_real_layout.py RUN [RUN ...] --out FIGURE.png [--split validate] [--labels L ...]

Each RUN holds a 64x64 VQ-VAE and an upsampler prior trained on the same coarse run (the first run's
coarse run and fine VQ-VAE draw the rows above). One slice of the split's first subject nearest each of
``--levels``; fine codes drawn at temperature 1 in the upsampler's default passes, seed ``--seed``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from oasisvq import data, figures
from oasisvq.download import OASIS_CREDIT
from oasisvq.prior import decode_uint8, load_prior
from oasisvq.tokenizer import load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="figure (PNG)")
    ap.add_argument("--split", default="validate")
    ap.add_argument("--levels", nargs="+", type=float, default=[0.15, 0.3, 0.45, 0.6, 0.75])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--labels", nargs="+", help="one row title per run (default: its upsampler's steps)")
    a = ap.parse_args(argv)
    if a.labels and len(a.labels) != len(a.runs):
        ap.error(f"--labels needs one title per run ({len(a.runs)}), got {len(a.labels)}")
    dev = torch.device("cpu")
    priors = [load_prior(run, "upsampler", "best", dev) for run in a.runs]
    coarse, _ = load_model(priors[0][1]["prior_config"]["coarse_run"], "best")
    fine, cfg = load_model(a.runs[0], "best")
    decoders = [fine] + [load_model(run, "best")[0] for run in a.runs[1:]]  # each run's 64x64 VQ-VAE, once
    held = data.load_slices(cfg.data, None, progress=False).split(a.split)
    subjects, levels = np.asarray(held.subjects), np.asarray(held.position)
    own = np.where(subjects == subjects[0], levels, np.inf)  # one subject, so the rows show one head
    pick = [int(np.argmin(np.abs(own - lv))) for lv in a.levels]
    real = held.uint8(pick)
    x = torch.from_numpy(real).float().div(255)[:, None]
    rows, names = [real], ["real"]
    with torch.no_grad():
        layout = decode_uint8(coarse, coarse.encode(x))
        rows += [layout[:, 0].numpy(), decode_uint8(fine, fine.encode(x))[:, 0].numpy()]
        names += ["coarse recon (read)", "fine recon (target)"]
        for i, (run, (prior, m), vq) in enumerate(zip(a.runs, priors, decoders)):
            codes = prior.sample(len(pick), tuple(m["grid"]), generator=torch.Generator().manual_seed(a.seed),
                                 cond=layout)
            rows.append(decode_uint8(vq, codes)[:, 0].numpy())
            names.append(a.labels[i] if a.labels else f"upsampled, {m['step']} steps")
            print(f"{run}: upsampler at {m['step']} steps, best validation bits {m['best_val_bits']:.3f}")
    titles = [f"real, level {levels[i]:.2f}" for i in pick] + [name for name in names[1:] for _ in pick]
    figures.slice_grid(np.concatenate(rows), a.out, titles=titles, cols=len(pick),
                       title=f"upsampler given the real layout ({a.split} subject)",
                       footer=f"Real slices: {OASIS_CREDIT}")
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
