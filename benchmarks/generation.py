"""Generation against the code grid, the prior kind and the budget: one table, each metric beside its
real-vs-real floor.

    python benchmarks/generation.py --runs RUN [RUN ...] --minutes 8 [--kinds maskgit transformer] [--n 64]
    python benchmarks/generation.py --runs RUN [RUN ...] --steps 2000 ...
    python benchmarks/generation.py --data PATH --budgets 10 30 60 --out DIR [--steps-from EARLIER_DIR]

With ``--budgets``, each row is ``oasisvq demo --data PATH --minutes M`` (the recipe the demo runs, scaled
to a total budget of M minutes: data, tokeniser(s), prior(s), sampling and evaluation all inside it) in
DIR/budget-M; a two-level row's grid reads "16x16+64x64" and its minutes add both levels. The budgets are
wall-clock, so a slower day trains fewer steps; ``--steps-from EARLIER_DIR`` trains every stage for the
steps it made in EARLIER_DIR/budget-M (``oasisvq demo --steps-from``), so that a change is compared with
an earlier row at the same steps on any day.

Each RUN is a trained VQ-VAE (``oasisvq train``; its grid and training time are read from it). For every
run: held-out reconstruction (``oasisvq evaluate``, whole slice and in the head, beside the down-f-up
floor), then for every prior kind: train for M minutes or S steps (reused if RUN/prior-<kind> exists, unless
--retrain), sample N slices (conditional priors at levels drawn uniformly over the head), and measure them
in the fixed feature space (``oasisvq evaluate-samples``; "2-sample decoded" is the two-sample accuracy of
the floor's slices through the run's tokeniser, what a perfect prior would score). Samples, grids and
samples_metrics.json go to OUT/<run name>/<kind>/ (default RUN/benchmark-generation/<kind>/); the table is
also written as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from oasisvq.checkpoint import load_checkpoint
from oasisvq.demo import MARKER, PRIOR, read_demo_steps, run_demo
from oasisvq.errors import OasisVQError
from oasisvq.evaluation import evaluate, evaluate_sample_dir, floor_name
from oasisvq.evaluation.generation import FEATURES_VERSION
from oasisvq.prior import prior_dir, train_prior
from oasisvq.sampling import sample

COLUMNS = [("run", "{}"), ("grid", "{}"), ("prior", "{}"), ("tok min", "{:.1f}"), ("prior min", "{:.1f}"),
           ("steps", "{}"), ("val bits", "{:.3f}"), ("SSIM", "{:.3f}"), ("in head", "{:.3f}"),
           ("floor", "{:.3f}"), ("floor in head", "{:.3f}"), ("2-sample acc", "{}"), ("2-sample decoded", "{:.2f}"),
           ("precision", "{}"), ("recall", "{}"),
           ("density", "{}"), ("coverage", "{}"), ("Frechet", "{}"), ("near-empty", "{}"), ("copies", "{}"),
           ("samples/s", "{:.2f}")]


def _pair(fid: dict, q: str, fmt: str = "{:.2f}") -> str:
    """A metric and its real-vs-real floor, as 'value [floor]'."""
    return f"{fmt.format(fid[q])} [{fmt.format(fid[q + '_floor'])}]"


def _table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[c]) for c, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def _row(name: str, kind: str, run: Path, rec: dict, rep: dict, samples_per_s: float, out: Path,
         meta: dict | None = None) -> dict:
    """One table row from a run's held-out reconstruction (``rec``), its samples' metrics (``rep``) and its
    prior's checkpoint metadata (``meta``, read here if not given)."""
    tok = load_checkpoint(run / "checkpoints" / "last.safetensors")[1]
    meta = meta or load_checkpoint(prior_dir(run, kind) / "last.safetensors")[1]
    floor = floor_name(rec)
    fid, mem = rep["fidelity"], rep["memorisation"]
    return {
        "run": name, "grid": f"{rec['code_grid']}x{rec['code_grid']}", "prior": kind,
        "tok min": tok.get("elapsed_s", float("nan")) / 60, "prior min": meta["elapsed_s"] / 60, "steps": meta["step"],
        "val bits": meta["best_val_bits"], "SSIM": rec["model"]["ssim"]["mean"],
        "in head": rec["model"]["ssim_head"]["mean"], "floor": rec["floors"][floor]["ssim"]["mean"],
        "floor in head": rec["floors"][floor]["ssim_head"]["mean"],
        "2-sample acc": _pair(fid, "two_sample_accuracy"),
        "2-sample decoded": fid.get("two_sample_accuracy_decoded", float("nan")), "precision": _pair(fid, "precision"),
        "recall": _pair(fid, "recall"), "density": _pair(fid, "density"),
        "coverage": _pair(fid, "coverage"), "Frechet": _pair(fid, "frechet", "{:.1f}"),
        "near-empty": f"{rep['empty']['samples_fraction']:.2f} [{rep['empty']['real_fraction']:.2f}]",
        "copies": f"{mem['copies']} [{mem['copy_fraction_floor'] * rep['n_samples']:.0f}]", "samples/s": samples_per_s,
        "conditional": meta["prior_config"]["num_classes"] > 0, "samples": str(out)}


def _budget_rows(data: Path, budgets: list[float], out: Path, n: int, device: str, steps_from: Path | None
                 ) -> list[dict]:
    rows = []
    for minutes in budgets:
        folder = out / f"budget-{minutes:g}"
        stage_steps = read_demo_steps(steps_from / folder.name / MARKER) if steps_from else None
        run_demo(folder, minutes=minutes, data=[str(data)], device=device, samples=n, overwrite=True, progress=False,
                 stage_steps=stage_steps)
        rec = json.loads((folder / "run" / "eval-test" / "metrics.json").read_text())
        rep = json.loads((folder / "samples" / "samples_metrics.json").read_text())
        info = json.loads((folder / "samples" / "samples.json").read_text())
        demo = json.loads((folder / MARKER).read_text())
        recipe = demo["recipe"]
        label = f"{data.name} {minutes:g} min" + (f" (steps of {steps_from})" if steps_from else "")
        row = _row(label, recipe["prior"], folder / "run", rec, rep, info["samples_per_second"], folder / "samples")
        row["stage steps"] = demo["steps"]
        if recipe["two_level"]:  # both levels' training time; the layout run's grid first
            layout = Path(recipe["layout_run"])
            row["tok min"] += load_checkpoint(layout / "checkpoints" / "last.safetensors")[1]["elapsed_s"] / 60
            layout_prior = load_checkpoint(prior_dir(layout, PRIOR) / "last.safetensors")[1]
            row["prior min"] += layout_prior["elapsed_s"] / 60
            row["grid"] = "{}x{}+".format(*layout_prior["grid"]) + row["grid"]
        rows.append(row)
        print(f"budget {minutes:g} min: done ({time.strftime('%H:%M:%S')})", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--runs", nargs="+", type=Path, help="trained VQ-VAE run folders")
    what.add_argument("--budgets", nargs="+", type=float, help="total budgets in minutes (with --data and --out)")
    ap.add_argument("--data", type=Path, help="data for --budgets (any layout oasisvq reads)")
    ap.add_argument("--steps-from", type=Path, help="with --budgets: an earlier --out whose budget-M/demo.json "
                                                    "steps every stage repeats, instead of the minutes")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per prior (minutes)")
    ap.add_argument("--steps", type=int, default=0, help="training budget per prior in steps, instead of --minutes "
                                                        "(the same on any machine)")
    ap.add_argument("--kinds", nargs="+", default=["maskgit", "transformer"])
    ap.add_argument("--n", type=int, default=64, help="samples per prior")
    ap.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance of conditional priors")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16, help="sampling batch size")
    ap.add_argument("--max-real", type=int, default=1000, help="held-out real slices compared")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/benchmark-generation)")
    ap.add_argument("--retrain", action="store_true", help="retrain priors that already exist")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    args = ap.parse_args(argv)
    arch = {k: v for k, v in (("layers", args.layers), ("width", args.width)) if v is not None}

    if args.budgets and not (args.data and args.out):
        ap.error("--budgets needs --data and --out")
    if args.steps_from and not args.budgets:
        ap.error("--steps-from is for --budgets")
    rows = []
    try:
        if args.budgets:
            rows = _budget_rows(args.data, args.budgets, args.out, args.n, args.device, args.steps_from)
        for run in args.runs or []:
            rec = evaluate(run, split="test", device=args.device, progress=False)
            for kind in args.kinds:
                out = (args.out / run.name if args.out else run / "benchmark-generation") / kind
                pdir = prior_dir(run, kind)
                if args.retrain or not (pdir / "last.safetensors").is_file():
                    train_prior(run, kind, epochs=10**6, max_minutes=0.0 if args.steps else args.minutes,
                                max_steps=args.steps, device=args.device, overwrite=True, progress=False, **arch)
                meta = load_checkpoint(pdir / "last.safetensors")[1]
                conditional = meta["prior_config"]["num_classes"] > 0
                info = sample(run, kind, n=args.n, out=out, temperature=args.temperature,
                              level=(0.0, 1.0) if conditional else None,
                              guidance=args.guidance if conditional else 1.0, batch_size=args.batch_size,
                              device=args.device, progress=False)
                rep = evaluate_sample_dir(run, out, max_real=args.max_real, device=args.device, progress=False)
                rows.append(_row(run.name, kind, run, rec, rep, info["samples_per_second"], out, meta))
                print(f"{run.name} {kind}: done ({time.strftime('%H:%M:%S')})", file=sys.stderr)
    except OasisVQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.n} samples per prior, guidance {args.guidance}; [real-vs-real floor]; features: "
          f"{FEATURES_VERSION.split(':')[0]}")
    print(_table(rows))
    target = args.out or args.runs[0] / "benchmark-generation"
    target.mkdir(parents=True, exist_ok=True)
    (target / "benchmark.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
