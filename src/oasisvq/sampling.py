"""Sample new slices from a trained prior: code grids from the prior, decoded by the run's VQ-VAE."""

from __future__ import annotations

import io
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes, atomic_write_text
from .errors import CheckpointError, ConfigError
from .models.priors import MaskedPrior, level_coordinates
from .prior import decode_uint8, fingerprint, load_prior, open_run, position_classes, prior_dir, saved_config

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DETAIL_SEED = 0x5EED_DE7A  # the upsampler's random stream: seed XOR this


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _coarse_chain(meta: dict[str, Any], which: str, dev: torch.device) -> list[tuple[Any, dict[str, Any], Any]]:
    """The priors below an upsampler, coarsest first, each with its metadata and the VQ-VAE that decodes its
    codes, each checked against the one the prior above it was trained on. An upsampler's coarse run may hold
    an upsampler itself (a cascade, e.g. 16x16 -> 32x32 -> 64x64): the chain then goes on down."""
    chain: list[tuple[Any, dict[str, Any], Any]] = []
    while meta["prior_config"]["kind"] == "upsampler":
        pcfg = meta["prior_config"]
        coarse_run = Path(pcfg["coarse_run"])
        if fingerprint(coarse_run) != meta.get("coarse_vqvae"):
            raise CheckpointError(f"{coarse_run}: its VQ-VAE changed after the upsampler was trained on its codes; "
                                  "train the upsampler again")
        model, cmeta = load_prior(coarse_run, pcfg["coarse_prior"], which, dev)
        if cmeta.get("vqvae") != meta["coarse_vqvae"]:
            raise CheckpointError(f"{prior_dir(coarse_run, pcfg['coarse_prior'])}: this prior belongs to another "
                                  f"VQ-VAE than the one the upsampler was trained on; train it again")
        chain.insert(0, (model, cmeta, open_run(coarse_run, dev)[0]))
        meta = cmeta
    return chain


def sample(run_dir: Path | str, prior: str = "maskgit", n: int = 16, out: Path | str | None = None,
           temperature: float = 1.0, top_k: int = 0, seed: int = 0, cond: int | None = None, *,
           level: float | tuple[float, float] | None = None, guidance: float = 1.0, steps: int | None = None,
           choice_temperature: float | None = None, batch_size: int = 16, device: str = "auto",
           which: str = "best", prefix: str = "sample", progress: bool = True) -> dict[str, Any]:
    """Generate ``n`` slices: ``out/<prefix>_000.png``..., ``out/samples_grid.png`` and ``out/samples.json``.

    Same seed, settings, batch size and device give byte-identical PNGs. A conditional (level) prior draws
    each slice's level uniformly from ``level`` (a number, or a (low, high) range within [0, 1]), or takes
    the level class ``cond``; with neither, classes follow their training frequencies. A prior trained on
    exact levels (``interpolate_levels``) is given the drawn level itself, not its class. ``guidance`` is the
    classifier-free guidance weight (0: unconditional, 1: plain conditional, > 1: stronger). ``steps`` sets
    the decoding passes of a masked (MaskGIT) prior; for the upsampler, its own passes (the coarse prior
    keeps its default), and the coarse layouts equal the coarse prior's own samples for the same seed.
    ``choice_temperature`` (masked priors, default 4.5) scales the noise that ranks which sampled codes a
    pass keeps, for the coarse and the fine prior alike: 0 keeps the most probable, a large value (1e6)
    keeps codes in random order (docs/generation_log.md "Decoding order").
    """
    from .training import pick_device

    if n <= 0:
        raise ConfigError(f"n must be positive, got {n}")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}")
    if not _NAME_OK.match(prefix):
        raise ConfigError(f"output name prefix {prefix!r} must be letters, digits, '_', '-' or '.' "
                          "(no folders: files stay inside the output folder)")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / f"samples-{prior}"
    names = [f"{prefix}_{i:03d}.png" for i in range(n)]
    root = out.resolve()
    for name in names + ["samples_grid.png", "samples.json"]:
        if (out / name).resolve().parent != root:
            raise ConfigError(f"{out / name}: output name escapes the output folder {out}")
    dev = pick_device(device)
    model, meta = load_prior(run_dir, prior, which, dev)
    vq, vq_cfg = open_run(run_dir, dev)
    if meta.get("vqvae") != fingerprint(run_dir):
        warnings.warn(f"{run_dir}: the VQ-VAE changed after the {prior} prior was trained", stacklevel=2)
    if meta.get("num_codes") != vq.cfg.num_codes or meta.get("image_size", vq_cfg.data.size) != vq_cfg.data.size:
        raise CheckpointError(
            f"{prior_dir(run_dir, prior) / (which + '.safetensors')}: this prior was trained for "
            f"{meta.get('num_codes')} codes on {meta.get('image_size')}px slices but the run's VQ-VAE has "
            f"{vq.cfg.num_codes} codes on {vq_cfg.data.size}px slices; train the prior again")
    # Below an upsampler: the coarsest prior draws the layout and takes the level, upsamplers refine it.
    chain = _coarse_chain(meta, which, dev)
    stages = chain + [(model, meta, vq)]
    cond_meta = stages[0][1]
    k_cls = cond_meta["prior_config"]["num_classes"]
    if cond is not None and not k_cls:
        raise ConfigError(f"the {prior} prior of {run_dir} is unconditional; drop cond (or train with num_classes)")
    if cond is not None and not 0 <= cond < k_cls:
        raise ConfigError(f"cond must be in [0, {k_cls}), got {cond}")
    lo, hi = (level, level) if isinstance(level, (int, float)) else (level or (0.0, 1.0))
    if level is not None and (not k_cls or cond is not None or not 0 <= lo <= hi <= 1):
        raise ConfigError(f"level {level!r}: needs a conditional prior, no cond, and 0 <= low <= high <= 1")
    if guidance < 0 or (guidance != 1 and not k_cls):
        raise ConfigError(f"guidance {guidance}: needs a conditional prior and a weight >= 0")
    masked = [isinstance(stage, MaskedPrior) for stage, _, _ in stages]  # the stages that decode in ranked passes
    extra = {}
    if steps is not None:
        if not masked[-1] or steps <= 0:
            raise ConfigError(f"steps {steps}: only maskgit and masked upsampler priors decode in steps "
                              "(a positive number)")
        extra["steps"] = steps
    ranking = {}  # for the coarse priors too: every masked stage ranks the codes it keeps
    if choice_temperature is not None:
        if not any(masked) or not 0 <= choice_temperature < math.inf:
            raise ConfigError(f"choice temperature {choice_temperature}: only maskgit and masked upsampler priors "
                              "rank codes (a finite number >= 0)")
        ranking["choice_temperature"] = choice_temperature
    # each stage's decoding options: the ranking for every masked stage, `steps` for the finest only
    passes = [{**ranking, **(extra if depth == len(chain) else {})} if is_masked else {}
              for depth, is_masked in enumerate(masked)]

    gen = torch.Generator(device=dev).manual_seed(seed)
    # Each upsampler draws from its own stream, so the layouts (levels, coarse codes) are those the coarser
    # priors alone draw with the same seed and batch size: a cascade compares with its parts sample by sample.
    detail_gens = [torch.Generator(device=dev).manual_seed((seed ^ DETAIL_SEED) + depth) for depth in range(len(chain))]
    conds = levels = prior_cond = None
    if k_cls:
        if level is not None:
            levels = lo + (hi - lo) * torch.rand(n, generator=gen, device=dev)
            conds = position_classes(levels.cpu().numpy(), k_cls).to(dev)  # the bins training counted
        elif cond is None:
            p = torch.tensor(cond_meta["class_counts"], dtype=torch.float, device=dev) + 1e-3
            conds = torch.multinomial(p, n, replacement=True, generator=gen)
        else:
            conds = torch.full((n,), cond, dtype=torch.long, device=dev)
        if levels is None:  # the middle of each level class
            levels = (conds.float() + 0.5) / k_cls
        # a prior that learned exact levels is given the drawn level itself (between its classes' centres)
        exact = level is not None and saved_config(cond_meta).interpolate_levels
        prior_cond = level_coordinates(levels, k_cls) if exact else conds
    out.mkdir(parents=True, exist_ok=True)
    images = []
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(total=n, desc=f"sample {prior}", disable=not progress) as bar:
        for b in range(0, n, batch_size):
            m = min(batch_size, n - b)
            c = None if prior_cond is None else prior_cond[b:b + m]
            # coarsest first; each upsampler reads the image of the codes below it. The coarser priors
            # decode in their own passes: `steps` are the finest prior's.
            idx = None  # the codes of the level below, once drawn
            for depth, (stage, stage_meta, _) in enumerate(stages):
                inputs = ({"generator": gen, "cond": c, "guidance": guidance} if depth == 0 else
                          {"generator": detail_gens[depth - 1], "cond": decode_uint8(stages[depth - 1][2], idx)})
                idx = stage.sample(m, tuple(stage_meta["grid"]), temperature, top_k, **inputs, **passes[depth])
            images.append(decode_uint8(vq, idx, batch_size=m)[:, 0].cpu().numpy())
            bar.update(m)
    seconds = time.perf_counter() - t0
    images = np.concatenate(images)
    for name, img in zip(names, images):
        atomic_write_bytes(out / name, _png_bytes(img))
    from .figures import slice_grid

    level_list = None if levels is None else [round(float(v), 4) for v in levels.cpu()]
    # The grid sweeps the levels in order (bottom of the head first), so it reads like a stack of slices.
    shown = np.arange(min(n, 64)) if level_list is None else np.argsort(level_list[:64], kind="stable")
    titles = None if level_list is None else [f"level {level_list[i]:.2f}" for i in shown]
    slice_grid(images[shown], out / "samples_grid.png", titles=titles,
               title=f"{prior} prior, T={temperature}, top_k={top_k}, guidance={guidance}, seed={seed}")
    info = {"run": str(run_dir), "prior": prior, "which": which, "n": n, "temperature": temperature,
            "top_k": top_k, "seed": seed, "cond": cond, "level": level, "guidance": guidance, "steps": steps,
            "choice_temperature": choice_temperature,
            "batch_size": batch_size, "device": str(dev), "files": names,
            "classes": None if conds is None else conds.cpu().tolist(), "levels": level_list,
            "seconds": seconds, "samples_per_second": n / seconds}
    atomic_write_text(out / "samples.json", json.dumps(info, indent=2) + "\n")
    return info
