"""Benchmark the priors of a trained run: train each for M minutes, sample, measure, print one table.

    python benchmarks/generation.py --run RUN_DIR --minutes 10 [--kinds transformer pixelcnn] [--n 64]

A prior that already exists in RUN_DIR/prior-<kind>/ is reused unless --retrain is given. Samples and
their samples_metrics.json go to OUT/<kind>/ (default RUN_DIR/benchmark-generation/). Each metric is
printed next to its real-vs-real floor (two halves of the held-out slices, same sample size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from oasisvq.checkpoint import load_checkpoint
from oasisvq.errors import OasisVQError
from oasisvq.evaluation import evaluate_sample_dir
from oasisvq.sampling import prior_dir, sample, train_prior


def _row(label: str, values: list, floor=None, fmt: str = "{:.4g}") -> str:
    cells = [fmt.format(v) if isinstance(v, (int, float)) and v is not None else str(v) for v in values]
    f = "" if floor is None else fmt.format(floor) if isinstance(floor, (int, float)) else str(floor)
    return f"{label:<34}" + "".join(f"{c:>14}" for c in cells) + f"{f:>14}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="a trained VQ-VAE run folder")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per prior (minutes)")
    ap.add_argument("--kinds", nargs="+", default=["transformer", "pixelcnn"])
    ap.add_argument("--n", type=int, default=64, help="samples per prior")
    ap.add_argument("--batch-size", type=int, default=16, help="sampling batch size")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-real", type=int, default=1000, help="held-out real slices compared")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--retrain", action="store_true", help="retrain priors that already exist")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    args = ap.parse_args(argv)
    out = args.out or args.run / "benchmark-generation"
    arch = {k: v for k, v in (("layers", args.layers), ("width", args.width)) if v is not None}

    results = {}
    try:
        for kind in args.kinds:
            pdir = prior_dir(args.run, kind)
            if args.retrain or not (pdir / "last.safetensors").is_file():
                t0 = time.perf_counter()
                train_prior(args.run, kind, epochs=10**6, max_minutes=args.minutes, device=args.device,
                            overwrite=True, **arch)
                print(f"{kind}: trained for {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
            meta = load_checkpoint(pdir / "last.safetensors")[1]
            info = sample(args.run, kind, n=args.n, out=out / kind, temperature=args.temperature,
                          top_k=args.top_k, batch_size=args.batch_size, device=args.device)
            report = evaluate_sample_dir(args.run, out / kind, max_real=args.max_real, device=args.device)
            results[kind] = {"train_min": meta["elapsed_s"] / 60, "steps": meta["step"],
                             "val_bits": meta["best_val_bits"], "samples_per_s": info["samples_per_second"],
                             "report": report}
    except OasisVQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    kinds = list(results)
    r0 = results[kinds[0]]["report"]
    get = lambda path: [_dig(results[k]["report"], path) for k in kinds]
    lines = [_row("metric", kinds, "real floor", fmt="{}"), "-" * (34 + 14 * (len(kinds) + 1))]
    lines.append(_row("train time (min)", [results[k]["train_min"] for k in kinds]))
    lines.append(_row("training steps", [results[k]["steps"] for k in kinds], fmt="{}"))
    lines.append(_row("val bits/code (best)", [results[k]["val_bits"] for k in kinds]))
    lines.append(_row("samples/s", [results[k]["samples_per_s"] for k in kinds]))
    lines.append(_row("Frechet distance", get("fidelity.frechet"), r0["fidelity"]["frechet_floor"]))
    lines.append(_row("KID", get("fidelity.kid"), r0["fidelity"]["kid_floor"]))
    lines.append(_row("pairwise SSIM (diversity)", get("diversity.samples_pairwise_ssim"),
                      r0["diversity"]["real_pairwise_ssim"]))
    lines.append(_row("nearest-train SSIM (mean)", get("memorisation.nearest_train_ssim.mean"),
                      r0["memorisation"]["heldout_nearest_train_ssim"]["mean"]))
    lines.append(_row("nearest-train SSIM (max)", get("memorisation.nearest_train_ssim.max")))
    lines.append(_row(f"copies (SSIM > {r0['memorisation']['threshold']})", get("memorisation.copies"), fmt="{}"))
    for q in r0["anatomy"]:
        lines.append(_row(f"{q}: W1 samples vs real", get(f"anatomy.{q}.wasserstein"),
                          r0["anatomy"][q]["floor_wasserstein"]))
    print(f"run {args.run}, {args.n} samples per prior, features: {r0['features_version']}")
    print("\n".join(lines))
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _dig(d: dict, path: str):
    for part in path.split("."):
        d = d[part]
    return d


if __name__ == "__main__":
    sys.exit(main())
