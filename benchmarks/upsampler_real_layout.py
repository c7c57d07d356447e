"""What an upsampler draws given a perfect layout: held-out real slices through the coarse run's VQ-VAE
(the blurred image the upsampler reads), then fine codes drawn by each run's upsampler and decoded. Beside
them the real slice and the fine run's own reconstruction (what the upsampler should learn to draw).
Separates the upsampler's share of the samples' look from the coarse prior's.

    python benchmarks/upsampler_real_layout.py RUN [RUN ...] --out FIGURE.png [--split validate] [--labels L ...]
        [--given F ...] [--resweeps N ...] [--resweep-share S] [--steps P] [--choice-temperature C]

Each RUN holds a VQ-VAE and an upsampler prior; each reads the real layout through its own coarse run
(a row per coarse run shows what it reads; the first run's VQ-VAE draws the target row). One slice of
the split's first subject nearest each of ``--levels``; fine codes drawn at temperature 1 in the
upsampler's default passes, seed ``--seed``.
``--given F`` adds, for the first run, a row per F with that share of the slice's *real* fine codes kept
(at random positions) and only the rest drawn: how much real detail the upsampler needs before it draws
anatomy. ``--resweeps N`` adds rows where the first run's drawn codes are drawn again N times over, a
random share ``--resweep-share`` of them each time, given the rest, in one pass (Gibbs sampling with the
upsampler's own conditionals, as Wang & Cho 2019 do with a masked language model): what those conditionals
settle into. For each run a table prints its loss (bits per masked code, all codes and inside the head)
on every fourth slice of the split at fixed mask ratios: how much the unmasked codes tell it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from oasisvq import data, figures
from oasisvq.download import OASIS_CREDIT
from oasisvq.prior import decode_uint8, load_prior
from oasisvq.tokenizer import load_model

RATIOS = (0.05, 0.25, 0.5, 0.75, 0.9, 1.0)


def keep_share(codes: torch.Tensor, share: float, mask_id: int, gen: torch.Generator) -> torch.Tensor:
    """``codes`` (N, h, w) with all but round(share * h * w) random positions per grid set to ``mask_id``."""
    n, h, w = codes.shape
    rank = torch.rand(n, h * w, generator=gen).argsort(1).argsort(1)
    drop = (rank >= round(share * h * w)).view(n, h, w)
    return codes.masked_fill(drop, mask_id)


@torch.no_grad()
def bits_by_mask_ratio(prior, codes: torch.Tensor, layout: torch.Tensor, seed: int) -> list[tuple[float, float, float]]:
    """(ratio, bits per masked code, bits per masked code whose target is not the background code)."""
    gen = torch.Generator().manual_seed(seed)
    background = torch.bincount(codes.flatten()).argmax()
    rows = []
    for ratio in RATIOS:
        masked = keep_share(codes, 1 - ratio, -1, gen) == -1
        bits = F.cross_entropy(prior(codes.masked_fill(masked, prior.mask_id), layout), codes,
                               reduction="none") / math.log(2)
        rows.append((ratio, bits[masked].mean().item(), bits[masked & (codes != background)].mean().item()))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="figure (PNG)")
    ap.add_argument("--split", default="validate")
    ap.add_argument("--levels", nargs="+", type=float, default=[0.15, 0.3, 0.45, 0.6, 0.75])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--labels", nargs="+", help="one row title per run (default: its upsampler's steps)")
    ap.add_argument("--given", nargs="+", type=float, default=[], help="shares of real fine codes kept (first run)")
    ap.add_argument("--resweeps", nargs="+", type=int, default=[], help="Gibbs sweeps after the first run's draw")
    ap.add_argument("--resweep-share", type=float, default=0.15, help="share of codes each sweep draws again")
    ap.add_argument("--steps", type=int, help="decoding passes (default: each upsampler's own)")
    ap.add_argument("--choice-temperature", type=float, default=4.5)
    a = ap.parse_args(argv)
    if a.labels and len(a.labels) != len(a.runs):
        ap.error(f"--labels needs one title per run ({len(a.runs)}), got {len(a.labels)}")
    if not all(0 <= g < 1 for g in a.given) or not 0 < a.resweep_share <= 1:
        ap.error("--given shares must be in [0, 1) and --resweep-share in (0, 1]")
    dev = torch.device("cpu")
    priors = [load_prior(run, "upsampler", "best", dev) for run in a.runs]
    coarse_runs = list(dict.fromkeys(m["prior_config"]["coarse_run"] for _, m in priors))  # in order, once each
    coarse = {path: load_model(path, "best") for path in coarse_runs}  # (VQ-VAE, its run config)
    fine, cfg = load_model(a.runs[0], "best")
    decoders = [fine] + [load_model(run, "best")[0] for run in a.runs[1:]]  # each run's 64x64 VQ-VAE, once
    held = data.load_slices(cfg.data, None, progress=False).split(a.split)
    pick = held.nearest_levels(a.levels)
    every_fourth = torch.from_numpy(held.uint8(np.arange(0, len(held), 4))).float().div(255)[:, None]
    real = held.uint8(pick)
    x = torch.from_numpy(real).float().div(255)[:, None]
    rows, names = [real], ["real"]
    draw = {"steps": a.steps, "choice_temperature": a.choice_temperature}
    with torch.no_grad():
        layouts = {path: decode_uint8(vq, vq.encode(x)) for path, (vq, _) in coarse.items()}
        real_codes = fine.encode(x)
        for path, layout in layouts.items():
            rows.append(layout[:, 0].numpy())
            side = coarse[path][1].data.size // coarse[path][1].model.downsample
            names.append("coarse recon (read)" if len(layouts) == 1 else f"{side}x{side} recon (read)")
        rows.append(decode_uint8(fine, real_codes)[:, 0].numpy())
        names.append("fine recon (target)")
        for i, (run, (prior, m), vq) in enumerate(zip(a.runs, priors, decoders)):
            below = coarse[m["prior_config"]["coarse_run"]][0]
            layout = layouts[m["prior_config"]["coarse_run"]]
            gen = torch.Generator().manual_seed(a.seed)
            codes = prior.sample(len(pick), tuple(m["grid"]), generator=gen, cond=layout, **draw)
            if i == 0:
                first_codes, first_gen = codes, gen  # the sweeps start from this draw and stream
            rows.append(decode_uint8(vq, codes)[:, 0].numpy())
            names.append(a.labels[i] if a.labels else f"upsampled, {m['step']} steps")
            print(f"{run}: upsampler at {m['step']} steps, best validation bits {m['best_val_bits']:.3f}")
            print("  mask ratio | bits per masked code | inside the head (not the background code)")
            for ratio, bits, head in bits_by_mask_ratio(prior, vq.encode(every_fourth),
                                                        decode_uint8(below, below.encode(every_fourth)), a.seed):
                print(f"  {ratio:10.2f} | {bits:20.3f} | {head:.3f}")
        prior, m = priors[0]
        layout = layouts[m["prior_config"]["coarse_run"]]
        codes, gen = first_codes, first_gen
        done = 0
        for sweeps in sorted(a.resweeps):
            for _ in range(sweeps - done):
                again = keep_share(codes, 1 - a.resweep_share, prior.mask_id, gen)
                codes = prior.sample(len(pick), tuple(m["grid"]), generator=gen, cond=layout, given=again, steps=1)
            done = sweeps
            rows.append(decode_uint8(fine, codes)[:, 0].numpy())
            names.append(f"+{sweeps} sweeps of {a.resweep_share:.0%}")
        for share in a.given:
            gen = torch.Generator().manual_seed(a.seed)
            given = keep_share(real_codes, share, prior.mask_id, gen)
            codes = prior.sample(len(pick), tuple(m["grid"]), generator=gen, cond=layout, given=given, **draw)
            rows.append(decode_uint8(fine, codes)[:, 0].numpy())
            names.append(f"{share:.0%} real codes given")
    titles = [f"real, level {held.position[i]:.2f}" for i in pick] + [name for name in names[1:] for _ in pick]
    figures.slice_grid(np.concatenate(rows), a.out, titles=titles, cols=len(pick),
                       title=f"upsampler given the real layout ({a.split} subject)",
                       footer=f"Real slices: {OASIS_CREDIT}")
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
