"""Which codes a MaskGIT pass keeps: the surest first (the default choice temperature) against random order
(a choice temperature of 1e6), on one run, at the same levels and seeds. Each sample set is measured
against the split's held-out slices as ``oasisvq evaluate-samples`` does, with the mean intensity inside
the head beside the held-out and the training slices'.

    python benchmarks/decoding_order.py RUN --out DIR [--prior upsampler] [--seeds 1 2 3] [--split validate]

Writes DIR/<order>-s<seed>/ (samples and their samples_metrics.json) and DIR/decoding_order.png: samples of both orders
at the same levels (first seed) above training slices at those levels. Prints one row per order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from oasisvq import data, figures, sampling
from oasisvq.config import RunConfig
from oasisvq.download import OASIS_CREDIT
from oasisvq.evaluation.generation import evaluate_sample_dir, read_sample_pngs, uses_oasis

ORDERS = {"confidence": None, "random": 1e6}  # None: the prior's default choice temperature (4.5)
SHOWN, SHOWN_LEVELS = 8, (0.2, 0.75)  # figure: samples at levels where the inside of the head shows


def _per_seed(rows: list[dict], fmt: str, get) -> str:
    return " / ".join(fmt.format(get(r)) for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prior", default="upsampler")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--split", default="validate")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--cache-dir", type=Path)
    a = ap.parse_args(argv)
    results: dict[str, list[dict]] = {}
    for order, choice in ORDERS.items():
        for seed in a.seeds:
            out = a.out / f"{order}-s{seed}"
            sampling.sample(a.run, a.prior, n=a.n, out=out, level=(0.0, 1.0), seed=seed, choice_temperature=choice,
                            progress=False)
            m = evaluate_sample_dir(a.run, out, a.split, cache_dir=a.cache_dir, progress=False)
            results.setdefault(order, []).append(m)
            print(f"{order} seed {seed}: two-sample {m['fidelity']['two_sample_accuracy']:.3f}", flush=True)

    first = results["confidence"][0]
    f, light = first["fidelity"], first["anatomy"]["head_intensity"]
    print(f"\n{a.run}, {a.prior}, {a.split} subject, levels U(0,1), seeds {' / '.join(map(str, a.seeds))}\n")
    print(f"| decoding | two-sample [{f['two_sample_accuracy_floor']:.2f}; {f['two_sample_accuracy_decoded']:.2f}] "
          f"| precision [{f['precision_floor']:.2f}] | recall [{f['recall_floor']:.2f}] "
          f"| Fréchet [{f['frechet_floor']:.0f}] "
          f"| copies of {a.n} [held-out {first['memorisation']['copy_fraction_floor']:.0%}] "
          f"| in-head intensity [held-out {light['real_mean']:.3f}; training {light['floor_mean']:.3f}] |")
    print("|---|---|---|---|---|---|---|")
    columns = (("two_sample_accuracy", "{:.3f}"), ("precision", "{:.2f}"), ("recall", "{:.2f}"), ("frechet", "{:.0f}"))
    for order, rows in results.items():
        cells = [_per_seed(rows, fmt, lambda r, q=q: r["fidelity"][q]) for q, fmt in columns]
        cells += [_per_seed(rows, "{}", lambda r: r["memorisation"]["copies"]),
                  _per_seed(rows, "{:.3f}", lambda r: r["anatomy"]["head_intensity"]["samples_mean"])]
        print(f"| {order} | {' | '.join(cells)} |")

    seed = a.seeds[0]
    drawn = {o: read_sample_pngs(a.out / f"{o}-s{seed}") for o in ORDERS}
    levels = np.asarray(drawn["confidence"][1]["levels"])  # the same levels for both: drawn before the codes
    inside = np.where((levels >= SHOWN_LEVELS[0]) & (levels <= SHOWN_LEVELS[1]))[0]
    show = inside[np.argsort(levels[inside])][np.linspace(0, len(inside) - 1, SHOWN).round().astype(int)]
    cfg = RunConfig.load(a.run / "config.json")
    train = data.load_slices(cfg.data, a.cache_dir, progress=False).split("train")
    real = train.uint8(train.nearest_levels(levels[show]))  # one training subject
    images = np.concatenate([drawn[o][0][show] for o in ORDERS] + [real])
    titles = [f"{o}, {levels[i]:.2f}" for o in ORDERS for i in show] + [f"training, {levels[i]:.2f}" for i in show]
    oasis = uses_oasis(cfg.data.paths, train.subjects)
    figures.slice_grid(images, a.out / "decoding_order.png", titles=titles, cols=SHOWN,
                       title=f"{a.prior} samples (seed {seed}): the surest codes first against random order",
                       footer=f"Real slices: {OASIS_CREDIT}" if oasis else None)
    print(f"\nwritten {a.out / 'decoding_order.png'}")


if __name__ == "__main__":
    main()
