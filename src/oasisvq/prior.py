"""The prior stage: train a prior over a run's code grids (through the one loop in training.py) and load it.

Layout inside a run folder::

    RUN_DIR/prior-<kind>/codes.safetensors   code grids of the train and validate splits (cache)
    RUN_DIR/prior-<kind>/last.safetensors    checkpoint to resume from (model, optimizer, RNG, counters)
    RUN_DIR/prior-<kind>/best.safetensors    weights with the lowest validation bits per code
    RUN_DIR/prior-<kind>/metrics.csv         one row per epoch (or per epoch cut short by the budget)
    RUN_DIR/prior-<kind>/curve.png           train / validation bits per code

The code cache is keyed by a hash of the VQ-VAE checkpoint it was encoded with, so retraining the VQ-VAE
re-encodes. With a conditional prior (``num_classes > 0``) the class of a slice is its level: its relative
position in the head, cut into ``num_classes`` equal bins (0 = first head-bearing slice); the prior learns
each slice's exact level, between its bins' centres (``interpolate_levels``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, training
from .checkpoint import load_checkpoint, remove_stale_temps, save_checkpoint
from .config import DataConfig
from .errors import CheckpointError, ConfigError, DataError
from .models.priors import PRIOR_KINDS, PriorConfig, build_prior, level_coordinates

METRIC_FIELDS = ["epoch", "step", "time_s", "lr", "train_bits", "val_bits"]
CODES_FILE = "codes.safetensors"
WARMUP_STEPS = 20  # linear learning-rate warm-up, then constant (100 cost 0.45 bits/code in a 130-step demo prior)
# 2: conditional priors learn a null class for classifier-free guidance (embedding tables grew by one row).
# 3: the upsampler reads the coarse run's reconstructions (format 2 read its code ids).
# 4: the upsampler's blocks are undilated (format 3's, dilated, hold weights of the same shapes).
PRIOR_FORMAT = 4
RETIRED_OPTIONS = frozenset({"coarse_codes"})  # saved by format 2, read by no later one: dropped on load
LEVEL_CLASSES = 8  # level classes a prior conditions on by default, where every slice has a level


def prior_dir(run_dir: Path | str, kind: str) -> Path:
    if kind not in PRIOR_KINDS:
        raise ConfigError(f"unknown prior kind {kind!r}; choose one of {', '.join(PRIOR_KINDS)}")
    return Path(run_dir) / f"prior-{kind}"


def open_run(run_dir: Path | str, device: torch.device):
    """The run's VQ-VAE (best checkpoint, eval mode) and its RunConfig."""
    from .tokenizer import load_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    return load_model(run_dir, "best", device)


def run_slices(run_cfg, cache_dir, progress: bool):
    return data.load_slices(run_cfg.data, cache_dir, progress=progress)


def fingerprint(run_dir: Path) -> str:
    """A hash of the run's VQ-VAE checkpoint: the codes of a prior belong to exactly one VQ-VAE."""
    h = hashlib.sha256()
    with open(Path(run_dir) / "checkpoints" / "best.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def position_classes(position: np.ndarray, num_classes: int) -> torch.Tensor:
    """Relative slice positions in [0, 1] -> class indices in [0, num_classes)."""
    pos = np.asarray(position, dtype=np.float64)
    if np.isnan(pos).any():
        raise DataError("a conditional prior needs the level of every slice, but some are unknown (volumes and "
                        "official case_N_slice_K PNGs have one; other PNG sets do not: use num_classes=0)")
    return torch.from_numpy(np.clip(np.floor(pos * num_classes), 0, num_classes - 1).astype(np.int64))


@torch.no_grad()
def encode_slices(model, slices, device: torch.device, batch_size: int = 64, progress: bool = True,
                  desc: str = "encode") -> torch.Tensor:
    """Code grids (N, h, w) int32 of every slice of a SliceSet (or of a uint8 array (N, H, W))."""
    batch = slices.tensor if hasattr(slices, "tensor") else lambda idx: data.images_tensor(slices[idx])
    out = []
    for i in tqdm(range(0, len(slices), batch_size), desc=desc, disable=not progress, leave=False):
        x = batch(np.arange(i, min(i + batch_size, len(slices)))).to(device)
        out.append(model.encode(x).to(torch.int32).cpu())
    return torch.cat(out)


def _codes_file(path: Path, vqvae_fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of the code cache ``path`` if the VQ-VAE of that fingerprint encoded them,
    else ({}, {}) (missing, stale or damaged: encode again)."""
    if not path.is_file():
        return {}, {}
    try:
        tensors, meta = load_checkpoint(path)
    except CheckpointError:
        return {}, {}
    if meta.get("vqvae") != vqvae_fingerprint or meta.get("kind") != "codes":
        return {}, {}
    return dict(tensors), meta


def current_codes(path: Path, vqvae_fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The code grids cached in ``path`` if they were encoded by the VQ-VAE of that fingerprint, else None."""
    return _codes_file(path, vqvae_fingerprint)[0] or None


def cached_codes(run_dir: Path | str, kind: str, model, run_cfg, device: torch.device,
                 cache_dir: Path | str | None = None, progress: bool = True, vqvae_fingerprint: str = "",
                 path: Path | None = None, tilts: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
    """Train/validate code grids and slice positions, from ``path`` (default
    ``prior-<kind>/codes.safetensors``) if it matches the run's current VQ-VAE (``vqvae_fingerprint``,
    hashed here if not given), else encoded now and cached. ``tilts`` = (copies, seed) > 0 copies adds
    ``train.tilted.codes`` / ``.position``: the codes of tilted copies of the training volumes."""
    path = path or prior_dir(run_dir, kind) / CODES_FILE
    fp = vqvae_fingerprint or fingerprint(Path(run_dir))
    tensors, meta = _codes_file(path, fp)
    tilted = [*tilts, data.TILT_VERSION]  # copies from an older tilt_volume are drawn again
    if tensors and (not tilts[0] or meta.get("tilts") == tilted):
        return tensors
    if not tensors:  # with other tilted copies only those are drawn again
        slices = run_slices(run_cfg, cache_dir, progress)
        for split in ("train", "validate"):
            part = slices.split(split)
            tensors[f"{split}.codes"] = encode_slices(model, part, device, progress=progress, desc=f"encode {split}")
            tensors[f"{split}.position"] = torch.from_numpy(np.asarray(part.position, dtype=np.float32))
    meta = {"kind": "codes", "vqvae": fp, "num_codes": model.cfg.num_codes}
    if tilts[0]:
        codes, levels = [], []
        for images, position in data.tilted_slices(run_cfg.data, *tilts, progress=progress):
            codes.append(encode_slices(model, images, device, progress=False))
            levels.append(torch.from_numpy(position.astype(np.float32)))
        tensors["train.tilted.codes"], tensors["train.tilted.position"] = torch.cat(codes), torch.cat(levels)
        meta["tilts"] = tilted
    save_checkpoint(path, tensors, meta)
    return tensors


@torch.no_grad()
def bits_per_code(prior, codes: torch.Tensor, cond: torch.Tensor | None, device: torch.device,
                  batch_size: int = 32) -> float:
    """The prior's validation loss on ``codes`` (N, h, w) in bits per predicted code: the negative
    log-likelihood for autoregressive priors, the masked-code loss at seeded masks for masked priors."""
    was_training = prior.training
    prior.eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # the same masks at every validation
        for i in range(0, len(codes), batch_size):
            x = codes[i:i + batch_size].long().to(device)
            c = None if cond is None else cond[i:i + batch_size].to(device)
            total += prior.loss(x, c).item() * x.numel()
            count += x.numel()
    prior.train(was_training)
    return total / max(count, 1) / math.log(2)


def _curve(rows: list[dict], path: Path, title: str) -> None:
    from . import figures

    plt = figures.plt
    with plt.rc_context(figures.STYLE):
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ep = [float(r["epoch"]) for r in rows]
        for key, label in (("train_bits", "train"), ("val_bits", "validation")):
            ax.plot(ep, [float(r[key]) for r in rows], marker="o" if len(rows) < 30 else None, ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("bits per code")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures.save(fig, path)


class _PriorLoss(nn.Module):
    """A prior's training loss as the loop's loss module (DDP wraps this, so gradients sync)."""

    def __init__(self, prior: nn.Module, unrolled: bool = False):
        super().__init__()
        self.prior, self.unrolled = prior, unrolled

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.unrolled:
            return self.prior.losses(x, cond, unrolled=True)
        return {"loss": self.prior.loss(x, cond)}


class PriorTask(training.Task):
    best_key, higher_is_better = "val_bits", False
    metric_fields = METRIC_FIELDS

    def __init__(self, cfg: PriorConfig, pdir: Path, codes: dict[str, torch.Tensor], vq, device: torch.device,
                 init_weights: bool, val_grids: int, meta: dict[str, Any]):
        self.cfg, self.device, self.pdir = cfg, device, pdir
        self.name = f"prior-{cfg.kind}"
        self.resume_hint = f"oasisvq train-prior {pdir.parent} --kind {cfg.kind} --resume"
        self.lr_hint = f"Lower the prior's learning rate (lr = {cfg.lr})"
        self.checkpoint_dir, self.metrics_path = pdir, pdir / "metrics.csv"
        self.train_codes, val_codes = codes["train.codes"], codes["validate.codes"]
        train_position = codes["train.position"]
        if cfg.tilts:  # the tilted copies' slices keep the level they have in their copy of the head
            self.train_codes = torch.cat([self.train_codes, codes["train.tilted.codes"]])
            train_position = torch.cat([train_position, codes["train.tilted.position"]])
        self.n_items = len(self.train_codes)
        val_pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(val_codes))[:val_grids])
        self.val_codes = val_codes[torch.from_numpy(val_pick)]
        self.train_cond = self.val_cond = None
        class_counts: list[int] = []
        if "train.coarse" in codes:  # an upsampler: the condition is the coarse run's image of each slice
            self.train_cond = codes["train.coarse"]
            self.val_cond = codes["validate.coarse"][torch.from_numpy(val_pick)]
        elif cfg.num_classes:
            positions = train_position, codes["validate.position"][torch.from_numpy(val_pick)]
            # the bins count the classes (and refuse slices without a level) whichever the prior learns
            self.train_cond, self.val_cond = (position_classes(p.numpy(), cfg.num_classes) for p in positions)
            class_counts = torch.bincount(self.train_cond, minlength=cfg.num_classes).tolist()
            if cfg.interpolate_levels:  # each slice's own level, between its classes' centres
                self.train_cond, self.val_cond = (level_coordinates(p, cfg.num_classes) for p in positions)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        grid = tuple(self.train_codes.shape[1:])
        self.model = build_prior(cfg, vq.cfg.num_codes, grid).to(device)
        if init_weights and cfg.init_from_codebook:
            self.model.init_from_codebook(vq.quantizer.codebook)
        self.loss_module = _PriorLoss(self.model, cfg.unrolled)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
        self._meta = dict(meta, kind="prior", prior_format=PRIOR_FORMAT, prior_config=dataclasses.asdict(cfg),
                          num_codes=vq.cfg.num_codes, grid=list(grid), class_counts=class_counts)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.train_codes[idx].long().to(self.device, non_blocking=True)
        return x, None if self.train_cond is None else self.train_cond[idx].to(self.device)

    def lr(self, step: int, progress: float) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / WARMUP_STEPS)  # then constant: extending a run is seamless

    def validate(self) -> dict[str, Any]:
        return {"val_bits": bits_per_code(self.model, self.val_codes, self.val_cond, self.device, self.cfg.batch_size)}

    def row(self, at: training.Position, train: dict[str, float], val: dict[str, Any]) -> dict[str, Any]:
        return {"epoch": round(at.epochs_done, 4), "step": at.step, "time_s": round(at.elapsed_s, 2), "lr": at.lr,
                "train_bits": train.get("masked", train["loss"]) / math.log(2), "val_bits": val["val_bits"]}

    def meta(self) -> dict[str, Any]:
        return self._meta

    def finish(self, last_val: dict[str, Any] | None) -> None:
        import csv

        with open(self.metrics_path, newline="") as f:
            rows = list(csv.DictReader(f))
        _curve(rows, self.pdir / "curve.png", f"{self.name}: bits per code")


@torch.no_grad()
def decode_uint8(vq, codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """A VQ-VAE's 8-bit images (N, 1, H, W) of code grids (N, h, w): the PNGs sampling writes, and the coarse
    reconstructions an upsampler reads (rounded alike in training and sampling)."""
    dev = next(vq.parameters()).device
    out = [vq.decode_indices(codes[i:i + batch_size].long().to(dev)).clamp(0, 1).mul(255).round().to(torch.uint8)
           for i in range(0, len(codes), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, 1, 1, 1), dtype=torch.uint8)


def coarse_images(cfg: PriorConfig, run_cfg, pdir: Path, device: torch.device, cache_dir, progress: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The coarse run's reconstructions of this run's train/validate slices (``{split}.images``; decoded
    from its code grids, which are cached in ``pdir``), and what the upsampler's metadata records of that
    run. Both runs must read the same slices in the same order."""
    coarse = Path(cfg.coarse_run)
    vq, coarse_cfg = open_run(coarse, device)
    same = lambda cfg, k: [str(Path(p).resolve()) for p in cfg.paths] if k == "paths" else getattr(cfg, k)
    differ = [f.name for f in dataclasses.fields(DataConfig)  # every data setting decides which slices
              if same(coarse_cfg.data, f.name) != same(run_cfg.data, f.name)]
    if differ:
        raise ConfigError(f"{coarse}: the coarse run reads other slices than this run (data {', '.join(differ)} "
                          "differ); train both tokenisers on the same data settings")
    if coarse_cfg.model.downsample <= run_cfg.model.downsample:  # checked before any slow encoding
        grid = lambda cfg: f"{cfg.data.size // cfg.model.downsample}^2"
        raise ConfigError(f"{coarse}: its {grid(coarse_cfg)} code grid is not coarser than this run's {grid(run_cfg)}")
    fp = fingerprint(coarse)
    # The coarse run's own prior has usually encoded these grids already: read them there (never write there).
    codes = current_codes(prior_dir(coarse, cfg.coarse_prior) / CODES_FILE, fp) or \
        cached_codes(coarse, "", vq, coarse_cfg, device, cache_dir, progress, vqvae_fingerprint=fp,
                     path=pdir / "coarse-codes.safetensors")
    for split in ("train", "validate"):
        codes[f"{split}.images"] = decode_uint8(vq, codes[f"{split}.codes"]).cpu()
    return codes, {"coarse_vqvae": fp, "coarse_grid": list(codes["train.codes"].shape[1:])}


def _check_format(path: Path, meta: dict[str, Any]) -> None:
    """Conditional priors of prior format 1 (oasisvq 0.1) have no null class, upsamplers before format 4
    read coarse code ids (format 2) or ran dilated blocks (3), and a prior of a later format, or with options
    this version lacks, cannot be rebuilt: say so in one line."""
    pcfg, fmt = meta.get("prior_config", {}), meta.get("prior_format", 1)
    if (fmt < 2 and pcfg.get("num_classes")) or (fmt < 4 and pcfg.get("kind") == "upsampler"):
        raise CheckpointError(
            f"{path}: a {'conditional' if fmt < 2 else pcfg['kind']} prior written by oasisvq "
            f"{meta.get('oasisvq_version', '0.1.0')} (prior format {fmt}); this oasisvq reads format {PRIOR_FORMAT}: "
            "train it again with --overwrite")
    unknown = sorted(set(pcfg) - {f.name for f in dataclasses.fields(PriorConfig)} - RETIRED_OPTIONS)
    if fmt > PRIOR_FORMAT or unknown:
        raise CheckpointError(
            f"{path}: written by oasisvq {meta.get('oasisvq_version', '?')} (prior format {fmt}"
            f"{'; options ' + ', '.join(unknown) if unknown else ''}), which this oasisvq (format {PRIOR_FORMAT}) "
            "cannot rebuild: use that version, or train the prior again with --overwrite")


def saved_config(meta: dict[str, Any]) -> PriorConfig:
    """The PriorConfig of a checkpoint's metadata, less RETIRED_OPTIONS (format 2's ``coarse_codes``: 0 but for
    the upsamplers that _check_format refuses). Priors saved before ``interpolate_levels`` learned level bins."""
    saved = {k: v for k, v in meta["prior_config"].items() if k not in RETIRED_OPTIONS}
    return PriorConfig(**{"interpolate_levels": False, **saved})


def train_prior(run_dir: Path | str, kind: str = "maskgit", epochs: int | None = None,
                max_minutes: float = 0.0, resume: bool = False, *, max_steps: int = 0, overwrite: bool = False, device: str = "auto",
                cache_dir: Path | str | None = None, progress: bool = True, val_grids: int = 512,
                **options: Any) -> dict[str, Any]:
    """Train a prior of ``kind`` on the code grids of the run's training split.

    ``options`` are :class:`PriorConfig` fields (layers, width, heads, num_classes, dropout, lr, batch_size,
    seed, kernel, init_from_codebook, cond_dropout, interpolate_levels, decode_steps, group, tilts (runs on
    volumes: tilted copies of the training volumes, ``data.tilted_slices``); for ``kind="upsampler"``:
    coarse_run, the run whose coarser reconstructions of the same slices condition it, coarse_prior, and
    autoregressive; for the masked kinds: unrolled, ``MaskedPrior.losses``).
    Without ``num_classes`` the prior conditions on the slice level (``LEVEL_CLASSES`` classes) when every slice
    has one, else on nothing.
    ``epochs`` is the total number of epochs (default: 10, or no limit when ``max_minutes`` or ``max_steps``
    is given; a resumed run continues up to it, by default to the saved total); ``max_minutes`` > 0 bounds
    the wall-clock time of this call, ``max_steps`` > 0 the optimizer steps of the whole run (the same on any
    machine), whichever ends first. Validation uses at most ``val_grids`` validate-split grids (a fixed
    subset). Returns the final metrics row plus paths.

    Under ``torchrun``, ``batch_size`` is per process, each rank reads its share of every global batch,
    rank 0 validates and writes, and a run resumes on another number of processes."""
    fields = {f.name for f in dataclasses.fields(PriorConfig)} - {"kind", "epochs", "max_minutes", "max_steps"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown prior option(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    run_dir = Path(run_dir)
    pdir = prior_dir(run_dir, kind)
    if kind == "upsampler" and not resume:  # the coarse image carries the level; the patch size comes later
        # width 64, six blocks: the measured recipe (README). 32 passes: it fills 16x the codes of a 16x16 grid
        # (on the validation subject, 32 against 12 passes: the same two-sample accuracy, a little more recall)
        options = {"num_classes": 0, "patch": 1, "decode_steps": 32, "width": 64, "layers": 6, **options}
        if options.get("coarse_run"):  # samples must find it from any working folder
            options["coarse_run"] = str(Path(options["coarse_run"]).resolve())
    if not resume:  # bad options fail before any slow encoding; the level classes are settled after it
        # a time or step budget alone rules (as in `oasisvq train`); with neither, 10 epochs
        default_epochs = 0 if max_minutes > 0 or max_steps > 0 else 10
        cfg = PriorConfig(kind=kind, epochs=default_epochs if epochs is None else epochs, max_minutes=max_minutes,
                          max_steps=max_steps, **{"num_classes": LEVEL_CLASSES, **options}).validate()
    last_path = pdir / "last.safetensors"
    if resume and not last_path.is_file():
        raise ConfigError(f"{pdir}: nothing to resume (no last.safetensors); train without --resume first")
    if not resume and last_path.is_file() and not overwrite:
        raise ConfigError(f"{pdir}: already holds a prior; pass --resume to continue it or --overwrite to replace it")
    with training.distributed_context() as (rank, world, local_rank):
        dev = training.rank_device(device, world, local_rank)
        vq, run_cfg = open_run(run_dir, dev)
        if pdir.is_dir() and rank == 0:
            remove_stale_temps(pdir)  # left by a call killed mid-write
        saved = load_checkpoint(last_path)[1] if resume else {}
        if resume:
            if saved.get("kind") != "prior":
                raise CheckpointError(f"{last_path}: not a prior checkpoint")
            _check_format(last_path, saved)
            if saved.get("num_codes") != vq.cfg.num_codes:
                raise CheckpointError(
                    f"{last_path}: this prior was trained on {saved.get('num_codes')} codes but the run's VQ-VAE "
                    f"now has {vq.cfg.num_codes}; train a new prior with --overwrite")
            cfg = saved_config(saved)
            differ = [k for k, v in options.items() if getattr(cfg, k) != v]
            if differ:
                raise ConfigError(f"{pdir}: --resume keeps the saved settings; these differ: {', '.join(differ)}")
            cfg.epochs, cfg.max_minutes, cfg.max_steps = (cfg.epochs if epochs is None else epochs), max_minutes, max_steps
        fp = fingerprint(run_dir)
        if resume and saved.get("vqvae") != fp and rank == 0:
            warnings.warn(f"{run_dir}: the VQ-VAE changed since this prior was started; its codes are re-encoded",
                          stacklevel=2)
        def read_codes(show: bool):
            codes = cached_codes(run_dir, kind, vq, run_cfg, dev, cache_dir, show, vqvae_fingerprint=fp,
                                 tilts=(cfg.tilts, cfg.seed))
            return codes, (coarse_images(cfg, run_cfg, pdir, dev, cache_dir, show) if cfg.kind == "upsampler" else None)

        if rank == 0:  # one rank encodes and caches the codes; the others then read the cache
            codes, coarse = read_codes(progress)
        training.barrier(world)
        if rank > 0:
            codes, coarse = read_codes(False)
        if len(codes["train.codes"]) == 0 or len(codes["validate.codes"]) == 0:
            raise DataError(f"{run_dir}: the train and validate splits must both hold slices")
        coarse_meta: dict[str, Any] = {}
        if coarse is not None:  # an upsampler: the coarse run's image of each slice becomes its condition
            coarse, coarse_meta = coarse
            for split in ("train", "validate"):
                a, b = coarse[f"{split}.position"], codes[f"{split}.position"]
                if a.shape != b.shape or not torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0)):  # NaN: no level
                    raise DataError(f"{cfg.coarse_run}: its {split} slices are not this run's; the upsampler needs "
                                    "both runs on the same slices")
                codes[f"{split}.coarse"] = coarse[f"{split}.images"]
            if resume and saved.get("coarse_vqvae") != coarse_meta["coarse_vqvae"]:
                raise CheckpointError(f"{last_path}: the coarse run's VQ-VAE changed since this upsampler was "
                                      "started; train a new one with --overwrite")
            cfg.patch = run_cfg.model.downsample
        if not resume and "num_classes" not in options:  # condition on the level wherever every slice has one
            known = all(bool(torch.isfinite(codes[f"{s}.position"]).all()) for s in ("train", "validate"))
            cfg.num_classes = LEVEL_CLASSES if known else 0
        cfg.validate()
        grid = tuple(codes["train.codes"].shape[1:])
        if resume and tuple(saved.get("grid", grid)) != grid:
            raise CheckpointError(f"{last_path}: this prior was trained on {tuple(saved['grid'])} code grids but "
                                  f"the run's VQ-VAE now makes {grid}; train a new prior with --overwrite")
        task = PriorTask(cfg, pdir, codes, vq, dev, init_weights=not resume, val_grids=val_grids,
                         meta={"vqvae": fp, "image_size": run_cfg.data.size, **coarse_meta})
        budget = training.Budget(epochs=cfg.epochs, max_minutes=cfg.max_minutes, batch_size=cfg.batch_size,
                                 seed=cfg.seed, minutes_per_call=True, max_steps=cfg.max_steps)
        result = training.fit(task, budget, resume=resume, rank=rank, world=world, progress=progress)
    return dict(result["row"], best_val_bits=result["best"], prior_dir=str(pdir), train_seconds=result["elapsed_s"],
                stopped_by_time=result["stopped_by_time"], num_classes=cfg.num_classes)


def load_prior(run_dir: Path | str, kind: str = "maskgit", which: str = "best",
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A trained prior of a run (eval mode) and its checkpoint metadata."""
    path = prior_dir(run_dir, kind) / f"{which}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: no trained {kind} prior; run `oasisvq train-prior {run_dir} --kind {kind}`")
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "prior":
        raise CheckpointError(f"{path}: not a prior checkpoint")
    _check_format(path, meta)
    model = build_prior(saved_config(meta), meta["num_codes"], tuple(meta["grid"]))
    training.load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    dev = device if isinstance(device, torch.device) else training.pick_device(device)
    return model.to(dev).eval(), meta
