"""``oasisvq report RUN_DIR``: one self-contained HTML file (figures inlined) and its Markdown twin.

Sections: data provenance (with the OASIS acknowledgement whenever OASIS data was used), config, training
curves, reconstruction metrics beside the non-learned floors with best/median/worst examples, codebook
use, prior likelihood, generated samples beside real slices, generation metrics beside their real-vs-real
floor, timings and machine.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import atomic_write_text, load_checkpoint
from .config import RunConfig
from .errors import CheckpointError, OasisVQError
from .evaluation.generation import uses_oasis
from .evaluation.reconstruction import floor_name


class _Doc:
    """Builds the HTML and Markdown side by side, so the two never drift apart."""

    def __init__(self, out: Path):
        self.out = out
        self.html: list[str] = []
        self.md: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self.md.append(f"{'#' * level} {text}\n")

    def p(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def code(self, text: str) -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.md.append(f"```\n{text}\n```\n")

    def table(self, header: list[str], rows: list[list]) -> None:
        cells = lambda row, tag: "".join(f"<{tag}>{html.escape(_fmt(c))}</{tag}>" for c in row)
        self.html.append("<table><tr>" + cells(header, "th") + "</tr>" +
                         "".join("<tr>" + cells(r, "td") + "</tr>" for r in rows) + "</table>")
        self.md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" +
                       "".join("| " + " | ".join(_fmt(c) for c in r) + " |\n" for r in rows))

    def figure(self, path: Path, caption: str) -> None:
        if not path.is_file():
            self.p(f"(figure missing: {path.name})")
            return
        name = f"{len(list((self.out / 'figures').glob('*.png'))):02d}_{path.name}"
        shutil.copyfile(path, self.out / "figures" / name)
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        self.md.append(f"![{caption}](figures/{name})\n\n*{caption}*\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;
padding:.3em .6em;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.88em;color:#555}.ack{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}"""


def write_report(run_dir: Path | str, out: Path | str | None = None, samples_dir: Path | str | None = None,
                 demo_info: dict | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (with ``figures/``) for a run; returns both paths."""
    from .download import OASIS_CREDIT
    from .figures import slice_grid

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.json); train one with `oasisvq train`")
    cfg = RunConfig.load(run_dir / "config.json")
    out = Path(out) if out else run_dir / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for old in (out / "figures").glob("*.png"):
        old.unlink()
    evals = _read_json(run_dir / "eval-test" / "metrics.json")
    samples_dir = Path(samples_dir) if samples_dir else _find_samples(run_dir)
    gen = _read_json(samples_dir / "samples_metrics.json") if samples_dir else None
    d = _Doc(out)

    d.h(1, f"oasisvq report: {run_dir.name}")
    d.p(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by oasisvq {__version__}.")

    # -- data
    d.h(2, "Data")
    subjects: list[str] = []
    if (run_dir / "eval-test" / "per_slice.csv").is_file():
        with open(run_dir / "eval-test" / "per_slice.csv", newline="") as f:
            subjects = [r["subject"] for r in csv.DictReader(f)]
    if demo_info and demo_info.get("data", {}).get("kind") == "mni152-template":
        di = demo_info["data"]
        d.p(f"Embedded demo data: {di['source']}. This is ONE template brain (an average of 152 adults), not "
            f"OASIS data and not a set of subjects. Its {di['levels']} axial levels were augmented "
            f"{di['copies']} times (random affine and elastic deformation, bias field, gamma, Rician-like noise). "
            f"Validation holds out levels {di['validate_levels'][0]}-{di['validate_levels'][1]} and test levels "
            f"{di['test_levels'][0]}-{di['test_levels'][1]} (with {di['margin_levels']}-level margins). Scores "
            "below measure generalisation to unseen levels and deformations of this template, not to unseen "
            "subjects: do not compare them with OASIS results.")
        d.table(["split", "slices"], [[k, v] for k, v in di["slices"].items()])
    else:
        d.p("Data: " + ", ".join(cfg.data.paths) + f" (slices {cfg.data.size}x{cfg.data.size}, "
            f"axis {cfg.data.axis} for volumes; split by subject, seed {cfg.data.seed}).")
    if uses_oasis(cfg.data.paths, subjects):
        d.html.append(f'<p class="ack">{html.escape(OASIS_CREDIT)}</p>')
        d.md.append(f"> {OASIS_CREDIT}\n")

    # -- config
    d.h(2, "Configuration")
    d.code(json.dumps(cfg.to_dict(), indent=2))

    # -- training
    d.h(2, "Training")
    d.figure(run_dir / "figures" / "training_curves.png", "Training loss and validation SSIM/PSNR against step.")
    d.figure(run_dir / "figures" / "validation_grid.png",
             "Validation slices: original | reconstruction | absolute error.")

    # -- reconstruction
    d.h(2, "Reconstruction on held-out test slices")
    if evals:
        floor = floor_name(evals)
        mm, fl, bl = evals["model"], evals["floors"][floor], evals["floors"]["all_black"]
        d.p(f"{evals['slices']} test slices of {evals['subjects']} subject(s); code grid {evals['code_grid']}x"
            f"{evals['code_grid']} of {evals['num_codes']} codes = {evals['bits_per_pixel']:.3f} bits per pixel. "
            "SSIM: Wang et al. (Gaussian sigma 1.5, data range 1), at native resolution.")
        d.table(["", "SSIM mean", "SSIM std", "SSIM p05", "SSIM in head", "PSNR dB", "PSNR in head", "MAE"], [
            ["VQ-VAE", mm["ssim"]["mean"], mm["ssim"]["std"], mm["ssim"]["p05"], mm["ssim_head"]["mean"],
             mm["psnr"]["mean"], mm["psnr_head"]["mean"], mm["mae"]["mean"]],
            [f"{floor.replace('_', '-')} (no learning)", fl["ssim"]["mean"], fl["ssim"]["std"], fl["ssim"]["p05"],
             fl["ssim_head"]["mean"], fl["psnr"]["mean"], fl["psnr_head"]["mean"], fl["mae"]["mean"]],
            ["all black", bl["ssim"]["mean"], bl["ssim"]["std"], bl["ssim"]["p05"], "", bl["psnr"]["mean"], "",
             bl["mae"]["mean"]],
        ])
        d.p(f"Fraction of slices with SSIM > 0.6: {mm['ssim']['fraction_above_0.6']:.3f}. Codebook: "
            f"{evals['codebook']['codes_used']} of {evals['num_codes']} codes used, perplexity "
            f"{evals['codebook']['perplexity']:.1f}.")
        d.figure(run_dir / "eval-test" / "best_median_worst.png",
                 "Best, median and worst test slices by SSIM: original | reconstruction | absolute error.")
        d.figure(run_dir / "eval-test" / "ssim_histogram.png", "Per-slice SSIM with the floors marked.")
    else:
        d.p("No evaluation found: run `oasisvq evaluate RUN_DIR` first.")
    d.figure(run_dir / "figures" / "codebook_usage.png", "How often each code is used on validation slices.")

    # -- priors
    d.h(2, "Prior over the codes")
    rows = []
    for pdir in sorted(run_dir.glob("prior-*")):
        metrics_csv = pdir / "metrics.csv"
        if metrics_csv.is_file():
            with open(metrics_csv, newline="") as f:
                r = list(csv.DictReader(f))
            vals = [float(x["val_bits"]) for x in r if x.get("val_bits") not in (None, "")]
            rows.append([pdir.name[6:], len(r), min(vals) if vals else float("nan")])
            d.figure(pdir / "curve.png", f"{pdir.name}: bits per code on train and validation grids.")
        if pdir.name == "prior-upsampler" and (pdir / "last.safetensors").is_file():
            pcfg = load_checkpoint(pdir / "last.safetensors")[1]["prior_config"]
            d.p(f"Two levels: the upsampler learns this run's codes given the coarser reconstruction of the same "
                f"slices by {pcfg['coarse_run']}, whose {pcfg['coarse_prior']} prior draws the layout (and takes "
                "the level) when sampling.")
    if rows:
        d.table(["prior", "evaluations", "best validation bits per code"], rows)
        d.p("Bits per code: the negative log-likelihood for autoregressive priors (transformer, PixelCNN), the "
            "loss on masked codes for MaskGIT; the two kinds do not compare with each other.")
    else:
        d.p("No prior trained: run `oasisvq train-prior RUN_DIR`.")

    # -- samples
    d.h(2, "Generated slices")
    if samples_dir and (samples_dir / "samples_grid.png").is_file():
        d.figure(samples_dir / "samples_grid.png", "New slices sampled from the prior and decoded by the VQ-VAE.")
        real = _real_grid(cfg, run_dir, run_dir / "figures" / "real_test_grid.png", slice_grid)
        if real:
            d.figure(real, "Real held-out test slices, for comparison.")
    if gen:
        fid, div, mem, nan = gen["fidelity"], gen["diversity"], gen["memorisation"], float("nan")
        d.p(f"Features: {gen['features_version']} (fixed and independent of the run, so numbers with the same "
            f"features version compare across runs; see evaluation/generation.py). {gen['n_samples']} samples "
            f"against {gen['n_real_heldout']} real held-out slices. The real-vs-real floor is the same metric for "
            f"{gen.get('n_compared', '?')} slices of the training subjects against the same held-out slices: a "
            "generator that reproduced its training data would score it.")
        decoded = "two_sample_accuracy_decoded" in fid
        pair = lambda label, q: [label, fid.get(q, nan), fid.get(f"{q}_floor", nan)] + \
            ([fid.get(f"{q}_decoded", nan)] if decoded else [])
        rows = [pair("two-sample classifier accuracy (0.5 = cannot tell them apart)", "two_sample_accuracy"),
                pair("precision (samples on the real manifold)", "precision"),
                pair("recall (real slices the samples reach)", "recall"),
                pair("density", "density"), pair("coverage", "coverage"),
                pair("Frechet distance", "frechet"), pair("KID", "kid")]
        rows += [pair(f"two-sample accuracy on the {name} alone", f"two_sample_{g}") for g, name in
                 (("net", "conv-net features"), ("intensity", "head histogram and area"),
                  ("spectrum", "power spectrum")) if f"two_sample_{g}" in fid]
        blank = [""] if decoded else []
        if "empty" in gen:
            rows.append([f"near-empty slices (head < {gen['empty']['area_threshold']:.0%} of the slice)",
                         gen["empty"]["samples_fraction"], gen["empty"]["real_fraction"], *blank])
        rows += [["mean pairwise SSIM (diversity; lower = more diverse)", div["samples_pairwise_ssim"],
                  div["real_pairwise_ssim"], *blank],
                 ["nearest-training-slice SSIM (median)", mem["nearest_train_ssim"]["median"],
                  mem.get("heldout_nearest_train_ssim", {}).get("median", nan), *blank]]
        for q, a in gen.get("anatomy", {}).items():
            rows.append([f"{q} (Wasserstein to real)", a["wasserstein"], a["floor_wasserstein"], *blank])
        if decoded:
            d.p("The decoded floor is the floor's slices after this run's tokeniser (encode, then decode): what a "
                "prior that drew the codes exactly as the training slices have them would score. The floor to the "
                "decoded floor is the tokeniser's share of the samples' gap, the decoded floor to the samples the "
                "prior's.")
        d.table(["metric", "samples", "real-vs-real floor", *(["decoded floor"] if decoded else [])], rows)
        levels = gen.get("per_level", {})
        if levels.get("bins"):
            cells = lambda b: [b.get(q, "skipped") for q in ("two_sample_accuracy", "two_sample_accuracy_floor",
                                                              "precision", "precision_floor", "recall",
                                                              "recall_floor")]
            d.table(["level", "samples", "two-sample acc.", "floor", "precision", "floor", "recall", "floor"],
                    [[f"{b['range'][0]:.2f}-{b['range'][1]:.2f}", b["n_samples"], *cells(b)]
                     for b in levels["bins"]])
        elif "skipped" in levels:
            d.p(f"Level-by-level comparison skipped: {levels['skipped']}.")
        if samples_dir and (samples_dir / "nearest_real.png").is_file():
            d.figure(samples_dir / "nearest_real.png", "Each sample beside its nearest held-out real slice in the "
                     "feature space (within the same level bin where levels are known).")
        floor_copies = mem.get("copy_fraction_floor")
        held = "" if floor_copies is None else f" (held-out real slices of other subjects: {floor_copies:.1%})"
        d.p(f"Near-copies of training slices (SSIM > {mem['threshold']}): {mem['copies']} of {gen['n_samples']}{held}. "
            f"Sampling speed: {_fmt(gen.get('samples_per_second') or float('nan'))} samples/s.")

    # -- timings
    d.h(2, "Timings and machine")
    if demo_info:
        steps = demo_info.get("steps", {})  # training stages only, keyed as timings_s
        d.table(["stage", "seconds", "steps"],
                [[k, v, steps.get(k, "")] for k, v in demo_info.get("timings_s", {}).items()] +
                [["total", demo_info.get("total_s", float("nan")), ""]])
        d.p(f"Machine: {demo_info.get('machine', 'unknown')}.")
        if "stage_steps" in demo_info:
            d.p("Each training stage made the steps an earlier demo made (--steps-from), not a share of "
                f"{demo_info.get('minutes', 0):g} minutes: the same recipe on a machine of any speed.")
    else:

        d.p(f"Report written on: {machine_description()}.")

    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>oasisvq report</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(d.html) + "</body></html>\n")
    atomic_write_text(out / "report.html", page)
    atomic_write_text(out / "report.md", "\n".join(d.md))
    return out / "report.html", out / "report.md"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _find_samples(run_dir: Path) -> Path | None:
    for cand in [run_dir / "samples", run_dir.parent / "samples"]:
        if (cand / "samples_grid.png").is_file():
            return cand
    return None


def _real_grid(cfg: RunConfig, run_dir: Path, path: Path, slice_grid) -> Path | None:
    from .data import load_slices

    try:
        test = load_slices(cfg.data, cache_dir=_cache_of(run_dir), progress=False).split("test")
    except OasisVQError:  # the data may have moved since training; the report is still useful without it
        return None
    pick = np.linspace(0, len(test) - 1, min(16, len(test))).astype(int)
    return slice_grid(test.uint8(pick), path, title="real held-out slices")


def _cache_of(run_dir: Path) -> Path | None:
    cache = run_dir.parent / "cache"
    return cache if cache.is_dir() else None


def machine_description(dev: torch.device | None = None) -> str:
    text = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, " \
           f"torch {torch.__version__}"
    if dev is not None and dev.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(dev)}"
    return text
