"""The ``oasisvq`` command line: it parses options and calls the library, nothing more.

Every problem the user can fix ends the command with one line ``oasisvq: error: ...`` and exit code 2
(130 for an interrupted run that saved a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from . import __version__
from .errors import ConfigError, OasisVQError


def _positive(kind: type, noun: str):
    """An argparse type accepting only positive values of ``kind``."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {v}")
        return v

    return parse


_positive_int = _positive(int, "an integer")
_positive_float = _positive(float, "a number")


def _level(text: str) -> float | tuple[float, float]:
    """``0.4`` or ``0.3:0.8``: a level or a range of levels in [0, 1] (0 = lowest head-bearing slice)."""
    try:
        parts = [float(t) for t in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a level (0.4) or a range (0.3:0.8)") from None
    if len(parts) > 2 or not all(0 <= p <= 1 for p in parts) or parts != sorted(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: levels lie in [0, 1], a range as LOW:HIGH")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``oasisvq: error: argument -n: ...`` (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"oasisvq: error: {message} (see `{self.prog} --help`)\n")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- commands


def cmd_data_inspect(a) -> int:
    from .config import DataConfig
    from .data import inspect

    cfg = DataConfig(size=a.size, axis=a.axis, image_pattern=a.pattern)
    grid = a.grid or Path(f"{Path(a.path).resolve().name or 'data'}_inspect.png")
    report = inspect(a.path, cfg, grid_png=grid, cache_dir=a.cache_dir, skip_bad=a.skip_bad,
                     progress=not a.no_progress)
    _print_json(report)
    return 0


def cmd_data_download(a) -> int:
    from .download import download_oasis1

    _print_json(download_oasis1(a.out, a.discs or None, accept_terms=a.accept_terms, base_url=a.base_url,
                                progress=not a.no_progress))
    return 0


def cmd_data_prepare(a) -> int:
    from .download import prepare_oasis1

    _print_json(prepare_oasis1(a.src, a.out, axis=a.axis, size=a.size, image=a.image, with_masks=a.with_masks,
                               format=a.format, seed=a.seed, progress=not a.no_progress))
    return 0


def build_train_config(a):
    """The run config from --config (JSON), a --preset, then explicit options, in that order."""
    from .config import RunConfig, TrainConfig, model_preset

    preset = a.preset or {None: "cpu", 4: "cpu", 8: "cpu-f8", 16: "cpu-f16"}[a.downsample]
    cfg = RunConfig.load(a.config) if a.config else RunConfig(model=model_preset(preset), train=TrainConfig())
    if a.config and a.preset:
        cfg.model = model_preset(a.preset)
    if a.downsample is not None and cfg.model.downsample != a.downsample:
        raise ConfigError(f"--downsample {a.downsample} contradicts the model's downsample "
                          f"{cfg.model.downsample} (from --preset or --config)")
    if a.data:
        cfg.data = replace(cfg.data, paths=[str(p) for p in a.data])
    if not cfg.data.paths:
        raise ConfigError("--data is required (a folder of PNG slices or volumes; repeat to combine sources)")
    overrides = {"epochs": a.epochs, "max_minutes": a.max_minutes, "max_steps": a.max_steps, "batch_size": a.batch_size,
                 "device": a.device, "seed": a.seed, "lr": a.lr, "compile": a.compile}
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg.train, k, v)
    if (a.max_minutes is not None or a.max_steps is not None) and a.epochs is None:
        cfg.train.epochs = 0  # a time or step budget alone
    if a.size is not None:
        cfg.data = replace(cfg.data, size=a.size)
    return cfg.validate()


def cmd_train(a) -> int:
    from .tokenizer import train

    if a.resume and not a.data and not a.config:
        cfg = None  # continue the run as configured on disk
        if a.epochs is not None or a.max_minutes is not None or a.max_steps is not None:
            from .config import RunConfig

            cfg = RunConfig.load(Path(a.out) / "config.json")
            alone = a.max_minutes or a.max_steps  # a new time or step budget alone, unless epochs are given too
            cfg.train.epochs = a.epochs if a.epochs is not None else (0 if alone else cfg.train.epochs)
            cfg.train.max_minutes = a.max_minutes if a.max_minutes is not None else cfg.train.max_minutes
            cfg.train.max_steps = a.max_steps if a.max_steps is not None else cfg.train.max_steps
    else:
        cfg = build_train_config(a)
    result = train(cfg, a.out, resume=a.resume, overwrite=a.overwrite, cache_dir=a.cache_dir,
                   progress=not a.no_progress, skip_bad=a.skip_bad)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        _print_json({"run": str(a.out), "validation": result})
    return 0


def cmd_evaluate(a) -> int:
    from .evaluation import evaluate, floor_name

    m = evaluate(a.run, data=a.data, split=a.split, out=a.out, which=a.checkpoint, device=a.device,
                 cache_dir=a.cache_dir, progress=not a.no_progress)
    f = m["code_grid"]
    floor = floor_name(m)
    print(f"{m['slices']} {a.split} slices of {m['subjects']} subjects, code grid {f}x{f}, "
          f"{m['bits_per_pixel']:.3f} bits/pixel")
    print(f"  SSIM whole slice {m['model']['ssim']['mean']:.4f} +- {m['model']['ssim']['std']:.4f}   "
          f"inside head {m['model']['ssim_head']['mean']:.4f}   PSNR {m['model']['psnr']['mean']:.2f} dB")
    print(f"  floors: {floor} SSIM {m['floors'][floor]['ssim']['mean']:.4f} (inside head "
          f"{m['floors'][floor]['ssim_head']['mean']:.4f}), all-black {m['floors']['all_black']['ssim']['mean']:.4f}")
    print(f"  written to {a.out or Path(a.run) / f'eval-{a.split}'}")
    return 0


def cmd_reconstruct(a) -> int:
    from .evaluation import reconstruct

    for p in reconstruct(a.run, a.inputs, a.out, which=a.checkpoint, device=a.device, progress=not a.no_progress):
        print(p)
    return 0


def cmd_train_prior(a) -> int:
    from .prior import train_prior

    options = {k: getattr(a, k) for k in ("layers", "width", "heads", "num_classes", "dropout", "lr", "batch_size",
                                          "seed", "kernel", "cond_dropout", "decode_steps", "group", "tilts")
               if getattr(a, k) is not None}
    if a.no_codebook_init:
        options["init_from_codebook"] = False
    if a.coarse is not None:
        options["coarse_run"] = str(a.coarse)
    if a.coarse_prior is not None:
        options["coarse_prior"] = a.coarse_prior
    if a.autoregressive:
        options["autoregressive"] = True
    if a.unrolled:
        options["unrolled"] = True
    result = train_prior(a.run, a.kind, epochs=a.epochs, max_minutes=a.max_minutes or 0.0, resume=a.resume,
                         max_steps=a.max_steps or 0, overwrite=a.overwrite, device=a.device, cache_dir=a.cache_dir,
                         progress=not a.no_progress, **options)
    if os.environ.get("RANK", "0") == "0":
        _print_json(result)
    return 0


def cmd_sample(a) -> int:
    from .sampling import sample

    info = sample(a.run, a.prior, n=a.n, out=a.out, temperature=a.temperature, top_k=a.top_k, seed=a.seed,
                  cond=a.cond, level=a.level, guidance=a.guidance, steps=a.steps,
                  choice_temperature=a.choice_temperature, batch_size=a.batch_size,
                  device=a.device, which=a.checkpoint, progress=not a.no_progress)
    out = a.out or Path(a.run) / f"samples-{a.prior}"
    print(f"{info['n']} samples in {out} ({info['samples_per_second']:.2f} samples/s)")
    return 0


def cmd_evaluate_samples(a) -> int:
    from .evaluation import evaluate_sample_dir

    m = evaluate_sample_dir(a.run, a.samples, split=a.split, max_real=a.max_real,
                            copy_threshold=a.copy_threshold, device=a.device, cache_dir=a.cache_dir,
                            seed=a.seed, progress=not a.no_progress, out=a.out)
    f, d, mem, e = m["fidelity"], m["diversity"], m["memorisation"], m["empty"]
    both = lambda q, fmt=".3f": f"{f[q]:{fmt}} [{f[q + '_floor']:{fmt}}]"
    print(f"{m['n_samples']} samples vs {m['n_real_heldout']} real {a.split} slices; in brackets the real-vs-real "
          f"floor (training vs held-out subjects, {m['n_compared']} slices)")
    print(f"  features {m['features_version'].split(':')[0]} ({m['features_fingerprint']})")
    print(f"  two-sample accuracy {both('two_sample_accuracy')} (0.5 = indistinguishable)")
    print(f"  precision {both('precision')}  recall {both('recall')}  density {both('density')}  "
          f"coverage {both('coverage')}")
    print(f"  Frechet {both('frechet', '.4g')}  KID {both('kid', '.4g')}")
    decoded = "two_sample_accuracy_decoded" in f
    if decoded:
        print(f"  decoded floor (the floor slices through this run's tokeniser: a perfect prior's score): "
              f"two-sample {f['two_sample_accuracy_decoded']:.3f}  precision {f['precision_decoded']:.3f}  "
              f"recall {f['recall_decoded']:.3f}")
    if "two_sample_spectrum" in f:
        group = lambda g: (f"{g} {f['two_sample_' + g]:.2f} [{f['two_sample_' + g + '_floor']:.2f}"
                           + (f"; decoded {f['two_sample_' + g + '_decoded']:.2f}]" if decoded else "]"))
        print(f"  two-sample on each feature group alone: {group('net')}  {group('intensity')}  {group('spectrum')}")
    print(f"  near-empty (head < {e['area_threshold']:.0%}) {e['samples_fraction']:.1%} [real {e['real_fraction']:.1%}]")
    print(f"  pairwise SSIM {d['samples_pairwise_ssim']:.4f} [real {d['real_pairwise_ssim']:.4f}]")
    print(f"  nearest-train SSIM mean {mem['nearest_train_ssim']['mean']:.4f} max {mem['nearest_train_ssim']['max']:.4f}"
          f" [held-out {mem['heldout_nearest_train_ssim']['mean']:.4f}]; copies (> {mem['threshold']}): {mem['copies']}"
          f" ({mem['copy_fraction']:.1%}) [held-out {mem['copy_fraction_floor']:.1%}]")
    for q, v in m["anatomy"].items():
        print(f"  {q}: mean {v['samples_mean']:.3f} [held-out {v['real_mean']:.3f}, training {v['floor_mean']:.3f}]"
              f"  W1 {v['wasserstein']:.4f} [{v['floor_wasserstein']:.4f}]")
    lv = m["per_level"]
    if "skipped" in lv:
        print(f"  per level: skipped ({lv['skipped']})")
    for b in lv.get("bins", []):
        where = f"  level {b['range'][0]:.2f}-{b['range'][1]:.2f} ({b['n_samples']} samples):"
        if "skipped" in b:
            print(f"{where} skipped ({b['skipped']})")
        else:
            print(f"{where} two-sample {b['two_sample_accuracy']:.3f} [{b['two_sample_accuracy_floor']:.3f}]  "
                  f"precision {b['precision']:.3f} [{b['precision_floor']:.3f}]  recall {b['recall']:.3f} "
                  f"[{b['recall_floor']:.3f}]")
    print(f"  written to {Path(a.samples) / 'samples_metrics.json'} and {m['nearest_real']['figure']}")
    return 0


def cmd_demo(a) -> int:
    from .demo import read_demo_steps, run_demo

    r = run_demo(a.out, minutes=a.minutes, data=a.data, device=a.device, samples=a.samples, overwrite=a.overwrite,
                 seed=a.seed, progress=not a.no_progress,
                 stage_steps=read_demo_steps(a.steps_from) if a.steps_from else None)
    stages = ", ".join(f"{stage.removeprefix('train_')} {n}" for stage, n in r["steps"].items())
    print(f"\nreport: {r['report_html']}")
    print(f"held-out SSIM {r['ssim']:.3f} ({'above' if r['ssim_above_0.6'] else 'NOT above'} 0.6; in-head "
          f"{r['ssim_head']:.3f}; non-learned floor {r['floor_ssim']:.3f}) in {r['minutes']:.1f} min "
          f"(training steps: {stages}; the same steps on any machine: --steps-from {Path(a.out) / 'demo.json'})")
    return 0


def cmd_report(a) -> int:
    from .report import write_report

    html_path, md_path = write_report(a.run, a.out, samples_dir=a.samples)
    print(html_path)
    print(md_path)
    return 0


# ------------------------------------------------------------------------------------------------ parser


# Options several commands share, each defined once here.


def _arg_run(p: argparse.ArgumentParser, help: str = "run folder") -> None:
    p.add_argument("run", type=Path, help=help)


def _opt_device(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", default=default, help="auto (default), cpu, cuda or cuda:N")


def _opt_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, help="slice cache folder (default: $OASISVQ_CACHE or ~/.cache/oasisvq)")


def _opt_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _opt_checkpoint(p: argparse.ArgumentParser, paths: bool = True) -> None:
    if paths:
        p.add_argument("--checkpoint", default="best", help="best (default), last, or a .safetensors path")
    else:
        p.add_argument("--checkpoint", default="best", choices=["best", "last"])


def _opt_budget(p: argparse.ArgumentParser, epochs_help: str, minutes_help: str) -> None:
    p.add_argument("--epochs", type=_positive_int, help=epochs_help)
    p.add_argument("--max-minutes", type=_positive_float, help=minutes_help)
    p.add_argument("--max-steps", type=_positive_int,
                   help="optimizer steps of the whole run (the same on any machine; with other limits, the first reached)")


def _opt_resume(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--resume", action="store_true", help=f"continue {what} from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists")


def _add_run_options(p: argparse.ArgumentParser, cache: bool = False) -> None:
    """The options every command that loads a run shares."""
    _opt_device(p)
    if cache:
        _opt_cache(p)
    _opt_progress(p)


def build_parser() -> argparse.ArgumentParser:
    from .models.priors import PRIOR_KINDS

    p = _Parser(prog="oasisvq", description=(
        "Learn brain MRI with a VQ-VAE, generate new slices from a prior over its codes, and measure both."))
    p.add_argument("--version", action="version", version=f"oasisvq {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    # demo and report
    dm = sub.add_parser("demo", help="run the whole pipeline on embedded real MRI and write a report",
                        description="Prepare data (the MNI152 template shipped with nilearn, augmented; or --data), "
                                    "train a small VQ-VAE, evaluate it, train a level-conditioned MaskGIT prior (from 40 "
                                    "CPU-minutes also a 64x64 VQ-VAE and an upsampler over its codes), sample new "
                                    "slices, measure them and write an HTML + Markdown report.")
    dm.add_argument("--out", type=Path, default=Path("oasisvq-demo"), help="output folder (default: oasisvq-demo)")
    dm.add_argument("--minutes", type=_positive_float, default=10.0, help="compute budget in minutes (default 10)")
    dm.add_argument("--data", action="append", help="use your own data instead (repeatable)")
    dm.add_argument("--samples", type=int, default=32, help="how many slices to generate (16..256, default 32)")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--steps-from", type=Path, metavar="DEMO_JSON",
                    help="train each stage for the steps a previous demo made (its demo.json) instead of minutes: "
                         "the same recipe on a slower or faster machine, for comparisons across days")
    dm.add_argument("--overwrite", action="store_true", help="replace a non-demo folder at --out")
    _add_run_options(dm)
    dm.set_defaults(func=cmd_demo)

    rp = sub.add_parser("report", help="write a self-contained HTML (+ Markdown) report of a run",
                        description="Data provenance, config, training curves, reconstruction metrics beside "
                                    "the floors, codebook use, prior likelihood, samples and generation metrics.")
    _arg_run(rp)
    rp.add_argument("--out", type=Path, help="report folder (default: RUN/report)")
    rp.add_argument("--samples", type=Path, help="folder written by `oasisvq sample` (default: looked up)")
    rp.set_defaults(func=cmd_report)

    # data
    data = sub.add_parser("data", help="inspect, download and prepare MRI data",
                          description="Inspect a data folder, download OASIS-1, or prepare it into slices.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    d = dsub.add_parser("inspect", help="report what a data folder holds and write a grid of sample slices",
                        description="Print layout, subjects and slices per split, shape, intensity range and "
                                    "problems of a data folder (keras PNG set, train/validate/test PNG folders, "
                                    "or volumes) and write a PNG grid of sample slices.")
    d.add_argument("path", help="data folder or volume file")
    d.add_argument("--grid", type=Path, help="where to write the sample grid (default: ./<folder>_inspect.png)")
    d.add_argument("--size", type=_positive_int, default=256, help="slice size after padding/resizing (256)")
    d.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"], help="volumes: slicing axis")
    d.add_argument("--pattern", default="", help="volumes: only files matching this glob (e.g. '*masked_gfc*')")
    d.add_argument("--skip-bad", action="store_true", help="skip unreadable files and list them instead of stopping")
    _opt_cache(d)
    _opt_progress(d)
    d.set_defaults(func=cmd_data_inspect)

    d = dsub.add_parser("download", help="download the OASIS-1 cross-sectional release",
                        description="Download and safely unpack the OASIS-1 disc archives (resumable, verified). "
                                    "Requires accepting the OASIS data use terms.")
    d.add_argument("dataset", choices=["oasis1"], help="which release (oasis1)")
    d.add_argument("--out", type=Path, required=True, help="download and unpack into this folder")
    d.add_argument("--discs", type=_positive_int, nargs="+", help="disc numbers 1..12 (default: all)")
    d.add_argument("--accept-terms", action="store_true", help="accept the OASIS data use terms (printed)")
    d.add_argument("--base-url", help="mirror base URL (also $OASISVQ_OASIS1_URL)")
    _opt_progress(d)
    d.set_defaults(func=cmd_data_download)

    d = dsub.add_parser("prepare", help="slice OASIS-1 volumes into a training set",
                        description="Find each subject's processed T88 image (and FSL segmentation) in an "
                                    "unpacked OASIS-1 release and write a keras-layout PNG set or the slice cache, "
                                    "split by subject. Running it again does only what is missing.")
    d.add_argument("src", type=Path, help="unpacked OASIS-1 folder")
    d.add_argument("--out", type=Path, required=True, help="output folder")
    d.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    d.add_argument("--size", type=_positive_int, default=256)
    d.add_argument("--image", default="masked_gfc", help="which T88 image: masked_gfc (default), gfc, ...")
    d.add_argument("--with-masks", action="store_true", help="also write FSL tissue masks (seg_ PNGs)")
    d.add_argument("--format", default="png", choices=["png", "cache"])
    d.add_argument("--seed", type=int, default=0, help="subject split seed")
    _opt_progress(d)
    d.set_defaults(func=cmd_data_prepare)

    # train
    t = sub.add_parser("train", help="train a VQ-VAE", description=(
        "Train a VQ-VAE on MRI slices into a run folder (config.json, metrics.csv, checkpoints/, figures/). "
        "Launch with torchrun for several processes or GPUs."))
    t.add_argument("--data", action="append", type=Path, help="data folder or volume (repeat to combine sources)")
    t.add_argument("--out", type=Path, required=True, help="run folder")
    t.add_argument("--config", type=Path, help="JSON run config (as written to a run's config.json)")
    t.add_argument("--preset", choices=["cpu", "cpu-f8", "cpu-f16", "gpu", "gpu-f8"], help="model preset (default: cpu)")
    _opt_budget(t, "number of epochs", "training time budget in minutes (all calls together)")
    t.add_argument("--batch-size", type=_positive_int, help="slices per step and process")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate")
    t.add_argument("--downsample", type=int, choices=[4, 8, 16], help="image size / code grid size")
    t.add_argument("--size", type=_positive_int, help="slice size (multiple of 16)")
    _opt_device(t, default=None)
    t.add_argument("--seed", type=int, help="random seed")
    t.add_argument("--compile", choices=["auto", "on", "off"],
                   help="torch.compile the model (default auto: runs of >= 1 minute or >= 100 steps)")
    _opt_resume(t, "the run in --out")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable data files (listed) instead of stopping")
    _opt_cache(t)
    _opt_progress(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="measure a trained VQ-VAE on held-out slices", description=(
        "Per-slice SSIM/PSNR/MAE (whole slice and inside the head) beside the all-black and down-f-up floors; "
        "writes per_slice.csv, metrics.json and figures."))
    _arg_run(e)
    e.add_argument("--data", action="append", help="data to evaluate on (default: the run's own data)")
    e.add_argument("--split", default="test", choices=["train", "validate", "test"])
    e.add_argument("--out", type=Path, help="output folder (default: RUN/eval-<split>)")
    _opt_checkpoint(e)
    _add_run_options(e, cache=True)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("reconstruct", help="reconstruct PNG slices or volumes with a trained VQ-VAE",
                       description="Write each reconstruction under the input's file name (PNG in, 8-bit PNG "
                                   "out; volume in, NIfTI out, slice by slice).")
    _arg_run(r)
    r.add_argument("inputs", nargs="+", help="PNG files, volumes or folders of them")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    _opt_checkpoint(r)
    _add_run_options(r)
    r.set_defaults(func=cmd_reconstruct)

    tp = sub.add_parser("train-prior", help="train a prior over a run's code grids", description=(
        "Encode the run's train/validate slices once (cached), train a MaskGIT, transformer or gated PixelCNN prior "
        "on the code grids; writes RUN/prior-<kind>/ (last/best.safetensors, metrics.csv, curve.png). The upsampler "
        "(--kind upsampler --coarse COARSE_RUN) learns this run's codes given a coarser run's reconstruction of the "
        "same slices; sampling it draws the layout from the coarse run's prior first and decodes it."))
    _arg_run(tp, "run folder with a trained VQ-VAE")
    tp.add_argument("--kind", default="maskgit", choices=list(PRIOR_KINDS))
    _opt_budget(tp, "total epochs (default 10, or no limit with --max-minutes; --resume: the saved total)",
                "time budget of this call in minutes")
    tp.add_argument("--layers", type=_positive_int, help="layers / blocks (default 4; upsampler 6)")
    tp.add_argument("--width", type=_positive_int, help="embedding size / channels (default 128; upsampler 64)")
    tp.add_argument("--heads", type=_positive_int, help="attention heads (transformer)")
    tp.add_argument("--kernel", type=_positive_int, help="kernel width (pixelcnn, autoregressive upsampler; odd)")
    tp.add_argument("--num-classes", type=int,
                    help="condition on the slice level: this many classes, blended at each exact level")
    tp.add_argument("--dropout", type=float,
                    help="dropout on embeddings and residual branches; regularises small sets (default 0)")
    tp.add_argument("--cond-dropout", type=float,
                    help="share of training grids whose level is hidden (teaches guidance; default 0.1)")
    tp.add_argument("--decode-steps", type=_positive_int,
                    help="maskgit / upsampler: parallel decoding passes (default 12; upsampler 32)")
    tp.add_argument("--group", type=_positive_int,
                    help="maskgit / upsampler: codes per side of one attention token (default 1; 2 makes a 32x32 grid "
                         "as cheap as a 16x16 one; an upsampler with G > 1 attends over the whole grid)")
    tp.add_argument("--coarse", type=Path, metavar="COARSE_RUN",
                    help="upsampler: a run with a coarser code grid on the same slices, whose prior draws the layout")
    tp.add_argument("--coarse-prior", choices=PRIOR_KINDS,
                    help="upsampler: the coarse run's prior kind that samples the coarse codes (default maskgit; "
                         "upsampler: a cascade of levels)")
    tp.add_argument("--autoregressive", action="store_true",
                    help="upsampler: draw the fine codes one by one in raster order (a gated PixelCNN reading the "
                         "coarse image, as VQ-VAE-2) instead of in parallel masked passes; slower to sample")
    tp.add_argument("--unrolled", action="store_true",
                    help="maskgit / upsampler: also train on grids whose masked codes the prior filled itself "
                         "(step-unrolled denoising), so it learns to correct its own draws; about 2x the time per step")
    tp.add_argument("--tilts", type=_positive_int, metavar="N",
                    help="train also on N tilted copies of every training volume (turned up to 10 degrees, scaled "
                         "up to 6%%, sliced again: new real cross-sections for small sets; volumes only, not the "
                         "upsampler)")
    tp.add_argument("--lr", type=_positive_float)
    tp.add_argument("--batch-size", type=_positive_int)
    tp.add_argument("--seed", type=int)
    tp.add_argument("--no-codebook-init", action="store_true", help="random code embeddings")
    _opt_resume(tp, "RUN/prior-<kind>")
    _add_run_options(tp, cache=True)
    tp.set_defaults(func=cmd_train_prior)

    sp = sub.add_parser("sample", help="generate slices from a trained prior", description=(
        "Write N 8-bit PNGs sample_000.png..., samples_grid.png and samples.json; the same seed (and batch "
        "size and device) gives byte-identical PNGs."))
    _arg_run(sp)
    sp.add_argument("--prior", default="maskgit", choices=list(PRIOR_KINDS))
    sp.add_argument("-n", type=_positive_int, default=16, help="number of samples")
    sp.add_argument("--out", type=Path, help="output folder (default: RUN/samples-<prior>)")
    sp.add_argument("--temperature", type=_positive_float, default=1.0)
    sp.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest codes (0: all)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--cond", type=int, help="level class (conditional priors)")
    sp.add_argument("--level", type=_level, help="level(s) to draw: 0.5, or a range 0.3:0.8 (conditional priors)")
    sp.add_argument("--guidance", type=float, default=1.0,
                    help="classifier-free guidance weight: 0 unconditional, 1 conditional (default), >1 stronger")
    sp.add_argument("--steps", type=_positive_int, help="maskgit / upsampler: decoding passes (default: the prior's; "
                    "for the upsampler, its own: the layout prior keeps its default)")
    sp.add_argument("--choice-temperature", type=float, help="maskgit / upsampler: noise on the ranking of the "
                    "codes each pass keeps (default 4.5; 0: most probable first; 1e6: random order)")
    sp.add_argument("--batch-size", type=_positive_int, default=16)
    _opt_checkpoint(sp, paths=False)
    _add_run_options(sp)
    sp.set_defaults(func=cmd_sample)

    es = sub.add_parser("evaluate-samples", help="measure generated slices", description=(
        "Two-sample classifier accuracy, precision/recall/density/coverage, Frechet distance and KID in a fixed "
        "feature space (comparable across runs), near-empty samples, diversity, memorisation and anatomy of the "
        "samples in a folder against the run's held-out slices, each beside a real-vs-real floor (training vs "
        "held-out subjects), per slice level where known; writes samples_metrics.json and nearest_real.png "
        "there (or in --out)."))
    _arg_run(es)
    es.add_argument("samples", type=Path, help="folder written by `oasisvq sample`")
    es.add_argument("--split", default="test", choices=["validate", "test"], help="held-out real slices")
    es.add_argument("--max-real", type=_positive_int, default=1000)
    es.add_argument("--copy-threshold", type=float, default=0.95, help="SSIM above which a sample is a copy")
    es.add_argument("--out", type=Path, help="folder for the metrics and figure (default: the samples folder)")
    es.add_argument("--seed", type=int, default=0)
    _add_run_options(es, cache=True)
    es.set_defaults(func=cmd_evaluate_samples)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        (parser if a.command != "data" else parser._subparsers._group_actions[0].choices["data"]).print_help()
        return 2
    old_format = warnings.formatwarning  # warnings (e.g. files skipped by --skip-bad) as one line each
    warnings.formatwarning = lambda message, category, *args, **kw: f"oasisvq: warning: {message}\n"
    try:
        return a.func(a) or 0
    except OasisVQError as e:
        print(f"oasisvq: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except OSError as e:  # a folder that is a file, no permission, a full disk: name the path, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"oasisvq: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oasisvq: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = old_format


if __name__ == "__main__":
    sys.exit(main())
