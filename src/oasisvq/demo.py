"""``oasisvq demo``: the whole pipeline on real MRI that ships with the install, in about ten minutes.

Default data: the MNI ICBM152 2009a nonlinear symmetric T1 template, which ships inside the ``nilearn``
wheel (installed by ``pip install oasisvq[demo]``; read from package data, never downloaded). It is an
average of 152 adult brains, so it is one anatomy: the demo augments its axial slices (random affine and
elastic deformations, intensity bias fields, gamma and noise) to get variety, and holds out contiguous
blocks of slice levels (with margins) for validation and test. Numbers from it measure generalisation to
unseen levels and deformations of one template, not to unseen subjects; the report says so. With
``--data PATH`` the same pipeline runs on the user's own data (any layout the data layer reads).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .checkpoint import atomic_write_text, load_checkpoint
from .config import DataConfig, RunConfig, TrainConfig, model_preset
from .data import fit_to_size, load_volume, scale_robust, volume_slices
from .errors import ConfigError, DataError

TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_CITATION = ("MNI ICBM152 2009a nonlinear symmetric T1 template (Fonov et al., NeuroImage 54:313-327, "
                     "2011; Fonov et al., NeuroImage 47:S102, 2009), as shipped in the nilearn package")
MARKER = "demo.json"
# The recipe benchmarks/generation.py found best on a CPU budget (README, "Generation"): a 16x16 code grid
# that a prior can lay out, and a level-conditioned MaskGIT prior.
PRESET, GPU_PRESET, PRIOR = "cpu-f16", "gpu-f8", "maskgit"
# From TWO_LEVEL_MINUTES on a CPU, the two-level code (docs/generation_log.md, "Two-level code"): the 16x16
# run and its MaskGIT lay the head out, a 64x64 run (FINE_PRESET) and an upsampler over its codes add the detail.
FINE_PRESET, FINE_PRIOR, TWO_LEVEL_MINUTES = "cpu", "upsampler", 40.0


def template_path() -> Path:
    """The MNI152 template inside the installed nilearn package (no download)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo's embedded MRI ships with nilearn: install it with `pip install oasisvq[demo]` "
                          "(or pass --data PATH to run on your own data)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / TEMPLATE_FILE
    if not path.is_file():
        raise DataError(f"{path}: the MNI152 template is missing from the installed nilearn package")
    return path


# ------------------------------------------------------------------------------------------ augmentation


def augment(slices: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Realistic variety for (N, 1, H, W) slices in [0, 1]: a small random affine (rotation, scale, shift),
    a smooth elastic warp, a multiplicative bias field, gamma and Rician-like noise."""
    n, _, h, w = slices.shape

    def u(*shape):  # uniform in [-1, 1]
        return torch.rand(*shape, generator=gen) * 2 - 1

    angle = u(n) * math.radians(8) * strength
    scale = 1 + u(n) * 0.08 * strength
    shift = u(n, 2) * 0.05 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    elastic = F.interpolate(u(n, 2, 5, 5) * 0.02 * strength, size=(h, w), mode="bicubic", align_corners=False)
    grid = grid + elastic.permute(0, 2, 3, 1)
    x = F.grid_sample(slices, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bias = torch.exp(F.interpolate(u(n, 1, 3, 3) * 0.15 * strength, size=(h, w), mode="bilinear",
                                   align_corners=True))
    gamma = torch.exp(u(n, 1, 1, 1) * 0.15 * strength)
    x = (x * bias).clamp(0, 1).pow(gamma)
    sigma = (0.005 + 0.015 * torch.rand(n, 1, 1, 1, generator=gen)) * strength
    noise_re = torch.randn(x.shape, generator=gen) * sigma
    noise_im = torch.randn(x.shape, generator=gen) * sigma
    return torch.sqrt((x + noise_re) ** 2 + noise_im**2).clamp(0, 1)  # magnitude of complex noise, as in MRI


def build_template_dataset(out: Path, size: int = 256, copies: int = 8, held_copies: int = 2, seed: int = 0,
                           progress: bool = True) -> dict:
    """Write augmented template slices as a train/validate/test PNG folder under ``out``.

    The head-bearing axial levels are cut into ten blocks; block 3 is validation and block 7 test, each
    with a three-level margin dropped on either side so no held-out level has a training neighbour closer
    than 4 mm."""
    vol = scale_robust(load_volume(template_path()))
    slices = volume_slices(vol, "axial")
    fg = (slices > 0.05).mean(axis=(1, 2))
    levels = np.flatnonzero(fg >= 0.05)
    blocks = np.array_split(levels, 10)
    margin = 3
    split_of: dict[int, str] = {}
    for b, block in enumerate(blocks):
        for z in block:
            split_of[int(z)] = "validate" if b == 3 else "test" if b == 7 else "train"
    for b in (3, 7):
        lo, hi = blocks[b][0], blocks[b][-1]
        for z in list(range(lo - margin, lo)) + list(range(hi + 1, hi + 1 + margin)):
            split_of.pop(int(z), None)
    gen = torch.Generator().manual_seed(seed)
    counts = {"train": 0, "validate": 0, "test": 0}
    # Written plainly into a temporary folder that is renamed once complete: one atomic step for the set
    # instead of an fsync per slice.
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in counts:
        (tmp / split).mkdir(parents=True)
    zs = sorted(split_of)
    base = torch.from_numpy(np.stack([fit_to_size(slices[z].astype(np.float32), size) for z in zs])).unsqueeze(1)
    for k in tqdm(range(copies), desc="augmenting template", disable=not progress, leave=False):
        x = augment(base, gen)
        for i, z in enumerate(zs):
            split = split_of[z]
            if split != "train" and k >= held_copies:
                continue
            img = np.rint(x[i, 0].numpy() * 255).astype(np.uint8)
            # case_N_slice_K names carry the level (K over the head-bearing levels) for level-conditioned priors
            Image.fromarray(img).save(tmp / split / f"mni152aug{k:02d}_slice_{z - levels[0]:03d}.png")
            counts[split] += 1
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"levels": len(zs), "slices": counts, "copies": copies, "held_out_copies": held_copies,
            "validate_levels": [int(blocks[3][0]), int(blocks[3][-1])],
            "test_levels": [int(blocks[7][0]), int(blocks[7][-1])], "margin_levels": margin,
            "test_level_range": [float((blocks[7][i] - levels[0]) / (levels[-1] - levels[0])) for i in (0, -1)]}


# ------------------------------------------------------------------------------------------------- demo


def budget_split(minutes: float) -> tuple[float, float]:
    """Training minutes of the VQ-VAE and of the prior within a total budget of ``minutes``.

    Data, validation, evaluation, sampling and the report take about 1.5 minutes plus 5% of the budget on
    a 2-core CPU (measured: 53 s of the 10-minute demo); the rest goes 65:35 to the tokeniser and the
    prior."""
    training = minutes - min(0.2 * minutes, 1.5 + 0.05 * minutes)
    return 0.65 * training, 0.35 * training


def two_level_split(minutes: float) -> tuple[float, float, float, float]:
    """Training minutes of the 16x16 tokeniser, its MaskGIT, the 64x64 tokeniser and the upsampler.

    The upsampler gets the largest share: it learns the detail the samples lack, still slowly at 800
    steps (the 60-minute run's upsampler trained on to 1,780 steps drew samples the two-sample test told
    apart less often in every seed; docs/generation_log.md, "The upsampler's share"), while the 16x16 run
    only lays out a blurred head. The rest (data, encoding both runs' codes, evaluation, sampling at about
    one slice per second, the report) is given 3 minutes plus 8% of the budget (at most a fifth of it)."""
    training = minutes - min(0.2 * minutes, 3 + 0.08 * minutes)
    return 0.15 * training, 0.16 * training, 0.24 * training, 0.45 * training


STAGES = ("train_vqvae", "train_prior")  # a demo's training stages, as keys of its demo.json "steps"
TWO_LEVEL_STAGES = ("train_vqvae", "train_prior", "train_vqvae_fine", "train_upsampler")


def read_demo_steps(path: Path | str) -> dict[str, int]:
    """The training steps each stage of a finished demo made (its demo.json), for ``run_demo(stage_steps=...)``."""
    path = Path(path)
    try:
        steps = json.loads(path.read_text())["steps"]
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (give the demo.json of a finished demo)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not the demo.json of a finished demo (no training steps: {e!r})") from None
    if not isinstance(steps, dict) or tuple(steps) not in (STAGES, TWO_LEVEL_STAGES) or not all(
            isinstance(n, int) and n > 0 for n in steps.values()):
        raise ConfigError(f"{path}: its steps {steps!r} are not positive step counts of the stages "
                          f"{', '.join(STAGES)} (and for two levels {', '.join(TWO_LEVEL_STAGES[2:])})")
    return steps


def _status(i: int, total: int, text: str) -> None:
    tqdm.write(f"[{i}/{total}] {text}")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if (out / MARKER).is_file() or overwrite:
            shutil.rmtree(out)  # a previous demo's output (or an explicit --overwrite)
        else:
            raise ConfigError(f"{out}: exists and is not an oasisvq demo folder; choose another --out or pass "
                              "--overwrite")
    out.mkdir(parents=True, exist_ok=True)


def run_demo(out: Path | str = "oasisvq-demo", minutes: float = 10.0, data: list[str] | None = None,
             device: str = "auto", samples: int = 32, overwrite: bool = False, seed: int = 0,
             progress: bool = True, two_level: bool | None = None, stage_steps: dict[str, int] | None = None) -> dict:
    """Data -> VQ-VAE -> held-out SSIM -> prior -> samples -> generation metrics -> report, in ``minutes``.

    ``two_level`` adds the detail stage (a 64x64 VQ-VAE and an upsampler over its codes, given the 16x16
    codes); by default it is on for CPU budgets of ``TWO_LEVEL_MINUTES`` or more. ``stage_steps`` (as
    ``read_demo_steps`` reads them from an earlier demo) trains each stage for that many steps instead of
    its share of the minutes, and its stages say whether there are two levels: the same recipe on a machine
    of any speed."""
    from .evaluation import evaluate, evaluate_sample_dir, floor_name
    from .prior import train_prior
    from .report import machine_description, write_report
    from .sampling import sample
    from .tokenizer import train
    from .training import pick_device

    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    if not 16 <= samples <= 256:
        raise ConfigError(f"--samples must be between 16 and 256, got {samples}")
    if stage_steps is not None:
        if two_level is None:
            two_level = "train_upsampler" in stage_steps
        if tuple(stage_steps) != (TWO_LEVEL_STAGES if two_level else STAGES):
            raise ConfigError(f"stage_steps {stage_steps!r} do not name the stages of a "
                              f"{'two' if two_level else 'one'}-level demo")
    out = Path(out)
    _prepare_out(out, overwrite)
    dev = pick_device(device)
    started = time.time()
    timings: dict[str, float] = {}
    # training steps made within each stage's minutes (keys as in timings): a slower machine makes fewer
    steps: dict[str, int] = {}
    if two_level is None:
        two_level = dev.type == "cpu" and minutes >= TWO_LEVEL_MINUTES
    total = 9 if two_level else 7
    step = iter(range(1, total + 1))
    info: dict = {"minutes": minutes, "device": str(dev), "seed": seed}
    if stage_steps is not None:
        info["stage_steps"] = stage_steps  # the budget: steps, not minutes
    atomic_write_text(out / MARKER, json.dumps(info, indent=2) + "\n")

    t = time.time()
    if data:
        paths = [str(p) for p in data]
        info["data"] = {"kind": "user", "paths": paths}
        _status(next(step), total, f"data: using {', '.join(paths)}")
    else:
        built = build_template_dataset(out / "data", seed=seed, progress=progress)
        paths = [str(out / "data")]
        info["data"] = {"kind": "mni152-template", "source": TEMPLATE_CITATION, **built}
        _status(next(step), total, f"data: MNI152 template, {built['levels']} axial levels, augmented to "
                                   f"{built['slices']['train']} train / {built['slices']['validate']} validate / "
                                   f"{built['slices']['test']} test slices (held-out levels)")
    timings["data"] = time.time() - t

    if two_level:
        vq_minutes, prior_minutes, fine_minutes, upsampler_minutes = two_level_split(minutes)
    else:
        vq_minutes, prior_minutes = budget_split(minutes)
    cfg = RunConfig(data=DataConfig(paths=paths, seed=seed), model=model_preset(PRESET),
                    train=TrainConfig(epochs=0, max_minutes=vq_minutes, batch_size=16, device=str(dev), seed=seed,
                                      evals_per_epoch=2, val_slices=64, warmup_steps=10))
    if dev.type == "cuda":
        cfg.model = model_preset(GPU_PRESET)
        cfg.train.batch_size = 32
    # `run` decodes the samples: the 16x16 run alone, or the 64x64 run under the 16x16 layout run
    layout_run = out / ("layout-run" if two_level else "run")
    run, kind = (out / "run", FINE_PRIOR) if two_level else (layout_run, PRIOR)
    info["recipe"] = {"two_level": two_level, "prior": kind, "run": str(run), "layout_run": str(layout_run)}

    def budget_of(key: str, minutes: float) -> tuple[float, int, str]:
        """A stage's (minutes, steps, words): its share of the minutes, or the steps it is told to make."""
        if stage_steps is None:
            return minutes, 0, f"{minutes:.1f} min"
        return 0.0, stage_steps[key], f"{stage_steps[key]} steps"

    def train_tokeniser(c: RunConfig, folder: Path, key: str) -> None:
        t = time.time()
        c.train.max_minutes, c.train.max_steps, words = budget_of(key, c.train.max_minutes)
        _status(next(step), total, f"train VQ-VAE ({c.model.downsample}x: {c.data.size // c.model.downsample}^2 codes "
                                   f"of {c.model.num_codes}) for {words} on {dev}")
        train(c, folder, overwrite=True, cache_dir=out / "cache", progress=progress)
        timings[key] = time.time() - t
        steps[key] = load_checkpoint(folder / "checkpoints" / "last.safetensors")[1]["step"]

    def train_a_prior(folder: Path, prior_kind: str, minutes: float, key: str, **options) -> dict:
        t = time.time()
        minutes, max_steps, words = budget_of(key, minutes)
        _status(next(step), total, f"train {prior_kind} prior for {words}")
        r = train_prior(folder, prior_kind, epochs=1000, max_minutes=minutes, max_steps=max_steps, device=str(dev),
                        cache_dir=out / "cache", progress=progress, batch_size=16, seed=seed, **options)
        timings[key] = time.time() - t
        steps[key] = r["step"]
        return r

    def evaluate_run() -> dict:  # the run that decodes the samples, once it is trained
        t = time.time()
        m = evaluate(run, split="test", cache_dir=out / "cache", device=str(dev), progress=progress)
        timings["evaluate"] = time.time() - t
        verdict = "above" if m["model"]["ssim"]["mean"] > 0.6 else "NOT above"
        name = floor_name(m)
        _status(next(step), total, f"evaluate: held-out SSIM {m['model']['ssim']['mean']:.3f} ({verdict} 0.6), "
                                   f"in-head {m['model']['ssim_head']['mean']:.3f}; {name} floor "
                                   f"{m['floors'][name]['ssim']['mean']:.3f}, in-head "
                                   f"{m['floors'][name]['ssim_head']['mean']:.3f}")
        return m

    train_tokeniser(cfg, layout_run, "train_vqvae")
    if two_level:
        prior = train_a_prior(layout_run, PRIOR, prior_minutes, "train_prior")
        fine = dataclasses.replace(cfg, model=model_preset(FINE_PRESET),
                                   train=dataclasses.replace(cfg.train, max_minutes=fine_minutes))
        train_tokeniser(fine, run, "train_vqvae_fine")
        m = evaluate_run()
        upsampler = train_a_prior(run, FINE_PRIOR, upsampler_minutes, "train_upsampler",
                                  coarse_run=str(layout_run), coarse_prior=PRIOR)
    else:
        m = evaluate_run()
        prior = train_a_prior(layout_run, PRIOR, prior_minutes, "train_prior")
    ssim_mean, floor = m["model"]["ssim"]["mean"], floor_name(m)

    t = time.time()
    # At the held-out test levels (the template's), so samples and the real slices they are measured
    # against show the same part of the head.
    levels = info["data"].get("test_level_range") if prior["num_classes"] else None
    s = sample(run, kind, n=samples, out=out / "samples", seed=seed, level=levels, device=str(dev),
               progress=progress)
    timings["sample"] = time.time() - t
    _status(next(step), total, f"sample: {samples} new slices at {s.get('samples_per_second', float('nan')):.1f}/s")

    t = time.time()
    g = evaluate_sample_dir(run, out / "samples", split="test", cache_dir=out / "cache", device=str(dev),
                            progress=progress)
    timings["generation_metrics"] = time.time() - t
    _status(next(step), total, "generation metrics: " + _headline_generation(g))

    scalars = lambda d: {k: v for k, v in d.items() if isinstance(v, (int, float, str))}
    info.update({"timings_s": timings, "steps": steps, "total_s": time.time() - started, "machine": machine_description(dev),
                 "prior": scalars(prior)})
    if two_level:
        info["upsampler"] = scalars(upsampler)
    atomic_write_text(out / MARKER, json.dumps(info, indent=2, default=str) + "\n")
    t = time.time()
    html, md = write_report(run, out / "report", samples_dir=out / "samples", demo_info=info)
    _status(next(step), total, f"report: {html}")
    result = {"report_html": str(html), "report_md": str(md), "ssim": ssim_mean,
              "ssim_head": m["model"]["ssim_head"]["mean"], "ssim_above_0.6": ssim_mean > 0.6,
              "floor_ssim": m["floors"][floor]["ssim"]["mean"], "minutes": (time.time() - started) / 60,
              "steps": steps}
    return result


def _headline_generation(g: dict) -> str:
    """Two-sample accuracy, precision/recall and Frechet distance, each with its real-vs-real floor."""
    f, nan = g.get("fidelity", {}), float("nan")
    both = lambda q, fmt=".2f": f"{f[q]:{fmt}} (real {f.get(q + '_floor', nan):{fmt}})"
    parts = []
    if "two_sample_accuracy" in f:
        decoded = f.get("two_sample_accuracy_decoded")
        parts.append(f"two-sample accuracy {f['two_sample_accuracy']:.2f} (real "
                     f"{f.get('two_sample_accuracy_floor', nan):.2f}, "
                     + ("" if decoded is None else f"real through the tokeniser {decoded:.2f}, ") + "chance 0.50)")
    if "precision" in f:
        parts.append(f"precision {both('precision')}, recall {both('recall')}")
    if "frechet" in f:
        parts.append(f"Frechet {both('frechet', '.1f')}")
    lines = g.get("anatomy", {}).get("dark_lines")
    if lines:
        parts.append(f"dark lines (sulci) over {lines['samples_mean']:.0%} of the inner head (real {lines['real_mean']:.0%})")
    mem = g.get("memorisation", {})
    if "copies" in mem:
        parts.append(f"{mem['copies']} near-copies of training slices (real {mem['copy_fraction_floor']:.0%})")
    return ", ".join(parts) or json.dumps(g)[:200]
