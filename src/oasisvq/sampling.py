"""Train a prior over a run's code grids, sample slices from it, and measure the samples.

Layout inside a run folder::

    RUN_DIR/prior-<kind>/codes.safetensors   code grids of the train and validate splits (cache)
    RUN_DIR/prior-<kind>/last.safetensors    checkpoint to resume from (model, optimizer, RNG, counters)
    RUN_DIR/prior-<kind>/best.safetensors    weights with the lowest validation bits per code
    RUN_DIR/prior-<kind>/metrics.csv         one row per epoch (or per interrupted epoch)
    RUN_DIR/prior-<kind>/curve.png           train / validation bits per code

The code cache is keyed by a hash of the VQ-VAE checkpoint it was encoded with, so retraining the VQ-VAE
re-encodes. With a conditional prior (``num_classes > 0``) the class of a slice is its relative position
in the volume, cut into ``num_classes`` equal bins (0 = first head-bearing slice).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import (
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_text,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .errors import CheckpointError, ConfigError, DataError
from .models.priors import PRIOR_KINDS, PriorConfig, build_prior

METRIC_FIELDS = ["epoch", "step", "time_s", "lr", "train_bits", "val_bits"]
CODES_FILE = "codes.safetensors"
WARMUP_STEPS = 20  # linear learning-rate warm-up, then constant (100 cost 0.45 bits/code in a 130-step demo prior)
SAVE_EVERY_S = 600  # mid-epoch checkpoint interval
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------------- helpers


def prior_dir(run_dir: Path | str, kind: str) -> Path:
    if kind not in PRIOR_KINDS:
        raise ConfigError(f"unknown prior kind {kind!r}; choose one of {', '.join(PRIOR_KINDS)}")
    return Path(run_dir) / f"prior-{kind}"


def _open_run(run_dir: Path | str, device: torch.device):
    """The run's VQ-VAE (best checkpoint, eval mode) and its RunConfig."""
    from .training import load_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    return load_model(run_dir, "best", device)


def _run_slices(run_cfg, cache_dir, progress: bool):
    from . import data  # looked up at call time: tests stand in their own slices

    return data.load_slices(run_cfg.data, cache_dir, progress=progress)


def _fingerprint(run_dir: Path) -> str:
    path = Path(run_dir) / "checkpoints" / "best.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:24]


def position_classes(position: np.ndarray, num_classes: int) -> torch.Tensor:
    """Relative slice positions in [0, 1] -> class indices in [0, num_classes)."""
    pos = np.asarray(position, dtype=np.float64)
    if np.isnan(pos).any():
        raise DataError("a conditional prior needs the slice position of every slice, but some are unknown "
                        "(PNG slices carry no position; use volumes or num_classes=0)")
    return torch.from_numpy(np.clip(np.floor(pos * num_classes), 0, num_classes - 1).astype(np.int64))


@torch.no_grad()
def encode_slices(model, slices, device: torch.device, batch_size: int = 64, progress: bool = True,
                  desc: str = "encode") -> torch.Tensor:
    """Code grids (N, h, w) int32 of every slice of a SliceSet."""
    out = []
    for i in tqdm(range(0, len(slices), batch_size), desc=desc, disable=not progress, leave=False):
        idx = np.arange(i, min(i + batch_size, len(slices)))
        out.append(model.encode(slices.tensor(idx).to(device)).to(torch.int32).cpu())
    return torch.cat(out)


def cached_codes(run_dir: Path | str, kind: str, model, run_cfg, device: torch.device,
                 cache_dir: Path | str | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Train/validate code grids and slice positions, from ``prior-<kind>/codes.safetensors`` if it
    matches the run's current VQ-VAE, else encoded now and cached."""
    path = prior_dir(run_dir, kind) / CODES_FILE
    fp = _fingerprint(Path(run_dir))
    if path.is_file():
        try:
            tensors, meta = load_checkpoint(path)
            if meta.get("vqvae") == fp and meta.get("kind") == "codes":
                return tensors
        except CheckpointError:
            pass  # damaged cache: rebuild it
    slices = _run_slices(run_cfg, cache_dir, progress)
    tensors = {}
    for split in ("train", "validate"):
        part = slices.split(split)
        tensors[f"{split}.codes"] = encode_slices(model, part, device, progress=progress, desc=f"encode {split}")
        tensors[f"{split}.position"] = torch.from_numpy(np.asarray(part.position, dtype=np.float32))
    save_checkpoint(path, tensors, {"kind": "codes", "vqvae": fp, "num_codes": model.cfg.num_codes})
    return tensors


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


@torch.no_grad()
def bits_per_code(prior, codes: torch.Tensor, cond: torch.Tensor | None, device: torch.device,
                  batch_size: int = 32) -> float:
    """Mean negative log-likelihood of ``codes`` (N, h, w) under ``prior``, in bits per code."""
    was_training = prior.training
    prior.eval()
    total, count = 0.0, 0
    for i in range(0, len(codes), batch_size):
        x = codes[i:i + batch_size].long().to(device)
        c = None if cond is None else cond[i:i + batch_size].to(device)
        total += F.cross_entropy(prior(x, c).float(), x, reduction="sum").item()
        count += x.numel()
    prior.train(was_training)
    return total / max(count, 1) / math.log(2)


# ------------------------------------------------------------------------------------------- training


def train_prior(run_dir: Path | str, kind: str = "transformer", epochs: int | None = None,
                max_minutes: float = 0.0,
                resume: bool = False, *, overwrite: bool = False, device: str = "auto",
                cache_dir: Path | str | None = None, progress: bool = True, val_grids: int = 512,
                **options: Any) -> dict[str, Any]:
    """Train a prior of ``kind`` on the code grids of the run's training split.

    ``options`` are :class:`PriorConfig` fields (layers, width, heads, num_classes, dropout, lr,
    batch_size, seed, kernel, init_from_codebook). ``epochs`` is the total number of epochs (default 10; a
    resumed run continues up to it, by default to the saved total); ``max_minutes`` > 0 bounds the
    wall-clock time of this call. Validation uses at most ``val_grids`` validate-split grids (a fixed
    subset). Returns the final metrics row plus paths.

    Under ``torchrun`` the prior is wrapped in DistributedDataParallel: ``batch_size`` is per process, each
    rank reads its share of every global batch, rank 0 validates and writes, and a run resumes on another
    number of processes.
    """
    from .training import distributed_context

    fields = {f.name for f in dataclasses.fields(PriorConfig)} - {"kind", "epochs", "max_minutes"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown prior option(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    with distributed_context() as (rank, world, local_rank):
        return _PriorTrainer(Path(run_dir), kind, epochs, max_minutes, resume, overwrite, device, cache_dir,
                             progress and rank == 0, val_grids, options, rank, world, local_rank).run()


class _PriorTrainer:
    def __init__(self, run_dir: Path, kind: str, epochs: int | None, max_minutes: float, resume: bool,
                 overwrite: bool, device: str, cache_dir, progress: bool, val_grids: int, options: dict,
                 rank: int, world: int, local_rank: int):
        from .training import autocast_for, pick_device, resume_position, wrap_ddp

        self.run_dir, self.kind, self.progress = run_dir, kind, progress
        self.rank, self.world = rank, world
        self.pdir = pdir = prior_dir(run_dir, kind)
        last_path = pdir / "last.safetensors"
        if resume and not last_path.is_file():
            raise ConfigError(f"{pdir}: nothing to resume (no last.safetensors); train without --resume first")
        if not resume and last_path.is_file() and not overwrite:
            raise ConfigError(f"{pdir}: already holds a prior; pass --resume to continue it or --overwrite to "
                              "replace it")
        dev = pick_device(device)
        if dev.type == "cuda" and world > 1:
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        self.dev = dev
        vq, run_cfg = _open_run(run_dir, dev)
        if pdir.is_dir() and rank == 0:
            remove_stale_temps(pdir)  # left by a call killed mid-write

        saved_t, saved = (load_checkpoint(last_path) if resume else ({}, {}))
        if resume:
            if saved.get("kind") != "prior":
                raise CheckpointError(f"{last_path}: not a prior checkpoint")
            if saved.get("num_codes") != vq.cfg.num_codes:
                raise CheckpointError(
                    f"{last_path}: this prior was trained on {saved.get('num_codes')} codes but the run's VQ-VAE "
                    f"now has {vq.cfg.num_codes}; train a new prior with --overwrite")
            cfg = PriorConfig(**saved["prior_config"])
            differ = [k for k, v in options.items() if getattr(cfg, k) != v]
            if differ:
                raise ConfigError(f"{pdir}: --resume keeps the saved settings; these differ: {', '.join(differ)}")
            cfg.epochs, cfg.max_minutes = (cfg.epochs if epochs is None else epochs), max_minutes
        else:
            cfg = PriorConfig(kind=kind, epochs=10 if epochs is None else epochs, max_minutes=max_minutes, **options)
        cfg.validate()
        self.cfg = cfg
        fingerprint = _fingerprint(run_dir)
        if resume and saved.get("vqvae") != fingerprint and rank == 0:
            warnings.warn(f"{run_dir}: the VQ-VAE changed since this prior was started; its codes are re-encoded",
                          stacklevel=3)

        if rank == 0:  # one rank encodes and caches the codes; the others then read the cache
            codes = cached_codes(run_dir, kind, vq, run_cfg, dev, cache_dir, progress)
        if world > 1:
            torch.distributed.barrier()
        if rank > 0:
            codes = cached_codes(run_dir, kind, vq, run_cfg, dev, cache_dir, progress=False)
        self.train_codes, val_codes = codes["train.codes"], codes["validate.codes"]
        if len(self.train_codes) == 0 or len(val_codes) == 0:
            raise DataError(f"{run_dir}: the train and validate splits must both hold slices")
        self.global_batch = cfg.batch_size * world
        self.n_batches = len(self.train_codes) // self.global_batch
        if self.n_batches == 0:
            raise ConfigError(f"batch size {cfg.batch_size} x {world} process(es) is larger than the training "
                              f"split ({len(self.train_codes)} code grids)")
        grid = tuple(self.train_codes.shape[1:])
        if resume and tuple(saved.get("grid", grid)) != grid:
            raise CheckpointError(f"{last_path}: this prior was trained on {tuple(saved['grid'])} code grids but "
                                  f"the run's VQ-VAE now makes {grid}; train a new prior with --overwrite")
        val_pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(val_codes))[:val_grids])
        self.val_codes = val_codes[torch.from_numpy(val_pick)]
        self.train_cond = self.val_cond = None
        class_counts: list[int] = []
        if cfg.num_classes:
            self.train_cond = position_classes(codes["train.position"].numpy(), cfg.num_classes)
            self.val_cond = position_classes(codes["validate.position"].numpy()[val_pick], cfg.num_classes)
            class_counts = torch.bincount(self.train_cond, minlength=cfg.num_classes).tolist()

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = build_prior(cfg, vq.cfg.num_codes, grid).to(dev)
        if cfg.init_from_codebook and not resume:
            self.model.init_from_codebook(vq.quantizer.codebook)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
        self.amp, _ = autocast_for(dev, True)
        self.ddp = wrap_ddp(self.model, dev) if world > 1 else None

        self.epoch = self.step = self.step_in_epoch = 0
        self.elapsed, self.best = 0.0, math.inf
        self.rows: list[dict] = []
        if resume:
            self.model.load_state_dict({k[6:]: v for k, v in saved_t.items() if k.startswith("model.")})
            optimizer_from_tensors(self.opt, saved_t, saved["optimizer"])
            set_rng_state(saved_t)
            self.epoch, self.step, self.step_in_epoch = saved["epoch"], saved["step"], saved["step_in_epoch"]
            self.epoch, self.step_in_epoch, self.step = resume_position(
                self.epoch, self.step_in_epoch, self.step, len(self.train_codes),
                int(saved.get("global_batch", cfg.batch_size)), self.global_batch)
            self.elapsed, self.best = saved["elapsed_s"], saved["best_val_bits"]
            if (pdir / "metrics.csv").is_file():
                with open(pdir / "metrics.csv", newline="") as f:
                    self.rows = list(csv.DictReader(f))[: saved["metrics_rows"]]
        self.meta_base = {"kind": "prior", "prior_config": dataclasses.asdict(cfg), "num_codes": vq.cfg.num_codes,
                          "grid": list(grid), "vqvae": fingerprint, "class_counts": class_counts,
                          "image_size": run_cfg.data.size, "global_batch": self.global_batch, "world_size": world}

    def save(self, name: str, full: bool) -> None:
        if self.rank != 0:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        meta = dict(self.meta_base, epoch=self.epoch, step=self.step, step_in_epoch=self.step_in_epoch,
                    elapsed_s=self.elapsed, best_val_bits=self.best, metrics_rows=len(self.rows))
        if full:
            opt_t, meta["optimizer"] = optimizer_to_tensors(self.opt)
            tensors.update(opt_t)
            tensors.update(rng_state())
        save_checkpoint(self.pdir / f"{name}.safetensors", tensors, meta)

    def _batch(self, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        start = self.step_in_epoch * self.global_batch + self.rank * self.cfg.batch_size
        idx = order[start:start + self.cfg.batch_size]
        x = self.train_codes[idx].long().to(self.dev, non_blocking=True)
        return x, None if self.train_cond is None else self.train_cond[idx].to(self.dev)

    def _end_epoch_row(self, train_loss_sum: float, n: int, lr: float) -> None:
        """All ranks: the mean train loss over ranks; rank 0: validation, the metrics row and checkpoints."""
        from .training import mean_over_ranks

        loss = mean_over_ranks({"loss": train_loss_sum / n}, self.dev)["loss"]
        if self.rank == 0:
            val = bits_per_code(self.model, self.val_codes, self.val_cond, self.dev, self.cfg.batch_size)
            self.rows.append({"epoch": round(self.epoch + self.step_in_epoch / self.n_batches, 4), "step": self.step,
                              "time_s": round(self.elapsed, 2), "lr": lr,
                              "train_bits": loss / math.log(2), "val_bits": val})
            if val < self.best:
                self.best = val
                self.save("best", full=False)
            self.save("last", full=True)
            atomic_write_csv(self.pdir / "metrics.csv", self.rows, METRIC_FIELDS)
            _curve(self.rows, self.pdir / "curve.png", f"prior-{self.kind}: bits per code")
        if self.world > 1:
            torch.distributed.barrier()

    def run(self) -> dict[str, Any]:
        from .errors import TrainingError
        from .training import Interrupted, _StopFlag, agree, epoch_order

        cfg, model = self.cfg, self.ddp or self.model
        call_start = seg_start = last_save = time.perf_counter()
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
        acc, acc_n, lr = 0.0, 0, cfg.lr
        (out_of_time,) = agree(time.perf_counter() - call_start > budget_s)  # then checked after every step
        model.train()
        bar = tqdm(total=max(cfg.epochs * self.n_batches - self.step, 0), desc=f"prior-{self.kind}",
                   disable=not self.progress)
        with _StopFlag() as stop:
            while self.epoch < cfg.epochs and not out_of_time:
                order = torch.from_numpy(epoch_order(len(self.train_codes), cfg.seed, self.epoch))
                while self.step_in_epoch < self.n_batches:
                    x, c = self._batch(order)
                    lr = cfg.lr * min(1.0, (self.step + 1) / WARMUP_STEPS)  # then constant: extending is seamless
                    for g in self.opt.param_groups:
                        g["lr"] = lr
                    with self.amp:
                        loss = F.cross_entropy(model(x, c).float(), x)
                    (nonfinite,) = agree(not torch.isfinite(loss))
                    if nonfinite:
                        raise TrainingError(f"{self.pdir}: the prior's loss became non-finite at step {self.step}; "
                                            f"lower the learning rate (lr={cfg.lr})")
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                    self.opt.step()
                    loss_value = loss.item()
                    acc, acc_n = acc + loss_value, acc_n + 1
                    self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
                    bar.update(1)
                    bar.set_postfix(bits=f"{loss_value / math.log(2):.3f}", epoch=self.epoch)
                    stopping, out_of_time = agree(stop.signal is not None, time.perf_counter() - call_start > budget_s)
                    if stopping:  # SIGINT/SIGTERM: save where we are and stop (as training does)
                        if self.step_in_epoch >= self.n_batches:
                            self.epoch, self.step_in_epoch = self.epoch + 1, 0
                        self.elapsed += time.perf_counter() - seg_start
                        self.save("last", full=True)
                        bar.close()
                        name = signal.Signals(stop.signal).name if stop.signal is not None else "another rank's signal"
                        raise Interrupted(
                            f"stopped by {name} at step {self.step}; checkpoint saved. "
                            f"Continue with: oasisvq train-prior {self.run_dir} --kind {self.kind} --resume")
                    if time.perf_counter() - last_save > SAVE_EVERY_S and self.step_in_epoch < self.n_batches:
                        self.elapsed, seg_start = self.elapsed + time.perf_counter() - seg_start, time.perf_counter()
                        self.save("last", full=True)  # long epochs: a crash loses at most SAVE_EVERY_S of work
                        last_save = time.perf_counter()
                    if out_of_time:
                        break
                if self.step_in_epoch >= self.n_batches:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                if acc_n == 0:
                    break  # nothing trained in this call (budget already spent)
                self.elapsed += time.perf_counter() - seg_start
                self._end_epoch_row(acc, acc_n, lr)
                seg_start = last_save = time.perf_counter()
                acc, acc_n = 0.0, 0
        bar.close()
        result = dict(self.rows[-1]) if self.rows else {}
        result.update({"best_val_bits": self.best, "prior_dir": str(self.pdir), "train_seconds": self.elapsed,
                       "stopped_by_time": out_of_time})
        return result

# ------------------------------------------------------------------------------------------- sampling


def load_prior(run_dir: Path | str, kind: str = "transformer", which: str = "best",
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained prior of a run (eval mode) and its checkpoint metadata."""
    path = prior_dir(run_dir, kind) / f"{which}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: no trained {kind} prior; run `oasisvq train-prior {run_dir} --kind {kind}`")
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "prior":
        raise CheckpointError(f"{path}: not a prior checkpoint")
    cfg = PriorConfig(**meta["prior_config"])
    model = build_prior(cfg, meta["num_codes"], tuple(meta["grid"]))
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: checkpoint does not fit its prior config ({str(e)[:200]})") from None
    dev = device if isinstance(device, torch.device) else torch.device(device)
    return model.to(dev).eval(), meta


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def sample(run_dir: Path | str, prior: str = "transformer", n: int = 16, out: Path | str | None = None,
           temperature: float = 1.0, top_k: int = 0, seed: int = 0, cond: int | None = None, *,
           batch_size: int = 16, device: str = "auto", which: str = "best", prefix: str = "sample",
           progress: bool = True) -> dict[str, Any]:
    """Generate ``n`` slices: ``out/<prefix>_000.png``..., ``out/samples_grid.png`` and ``out/samples.json``.

    Same seed, settings, batch size and device give byte-identical PNGs. ``cond`` picks the slice-position
    class of a conditional prior; when None, classes are drawn from their training frequencies.
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
    vq, vq_cfg = _open_run(run_dir, dev)
    if meta.get("vqvae") != _fingerprint(run_dir):
        warnings.warn(f"{run_dir}: the VQ-VAE changed after the {prior} prior was trained", stacklevel=2)
    if meta.get("num_codes") != vq.cfg.num_codes or meta.get("image_size", vq_cfg.data.size) != vq_cfg.data.size:
        raise CheckpointError(
            f"{prior_dir(run_dir, prior) / (which + '.safetensors')}: this prior was trained for "
            f"{meta.get('num_codes')} codes on {meta.get('image_size')}px slices but the run's VQ-VAE has "
            f"{vq.cfg.num_codes} codes on {vq_cfg.data.size}px slices; train the prior again")
    k_cls = meta["prior_config"]["num_classes"]
    if cond is not None and not k_cls:
        raise ConfigError(f"the {prior} prior of {run_dir} is unconditional; drop cond (or train with num_classes)")
    if cond is not None and not 0 <= cond < k_cls:
        raise ConfigError(f"cond must be in [0, {k_cls}), got {cond}")

    gen = torch.Generator(device=dev).manual_seed(seed)
    conds = None
    if k_cls:
        if cond is None:
            p = torch.tensor(meta["class_counts"], dtype=torch.float, device=dev) + 1e-3
            conds = torch.multinomial(p, n, replacement=True, generator=gen)
        else:
            conds = torch.full((n,), cond, dtype=torch.long, device=dev)
    grid = tuple(meta["grid"])
    out.mkdir(parents=True, exist_ok=True)
    images = []
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(total=n, desc=f"sample {prior}", disable=not progress) as bar:
        for b in range(0, n, batch_size):
            m = min(batch_size, n - b)
            c = None if conds is None else conds[b:b + m]
            idx = model.sample(m, grid, temperature, top_k, generator=gen, cond=c)
            img = vq.decode_indices(idx)[:, 0].float().mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            images.append(img)
            bar.update(m)
    seconds = time.perf_counter() - t0
    images = np.concatenate(images)
    for name, img in zip(names, images):
        atomic_write_bytes(out / name, _png_bytes(img))
    from .figures import slice_grid

    titles = None if conds is None else [f"class {int(v)}" for v in conds[:64].cpu()]
    slice_grid(images[:64], out / "samples_grid.png", titles=titles,
               title=f"{prior} prior, T={temperature}, top_k={top_k}, seed={seed}")
    info = {"run": str(run_dir), "prior": prior, "which": which, "n": n, "temperature": temperature,
            "top_k": top_k, "seed": seed, "cond": cond, "batch_size": batch_size, "device": str(dev),
            "files": names, "classes": None if conds is None else conds.cpu().tolist(),
            "seconds": seconds, "samples_per_second": n / seconds}
    atomic_write_text(out / "samples.json", json.dumps(info, indent=2) + "\n")
    return info
