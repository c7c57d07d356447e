"""Training the VQ-VAE: one plain loop, resumable to the step, on CPU, CUDA and under torchrun.

A run folder holds ``config.json`` (written first), ``metrics.csv``, ``checkpoints/{last,best}.safetensors``
and ``figures/``. Checkpoints carry the config, optimizer, RNG and data-order position, so ``resume``
continues exactly where the run stopped. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the model is
wrapped in DistributedDataParallel, each rank reads its share of every global batch, and only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import __version__
from .checkpoint import (
    atomic_write_csv,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import RunConfig
from .data import SliceSet, load_slices
from .errors import CheckpointError, ConfigError, OasisVQError, TrainingError
from .metrics import reconstruction_metrics
from .models import VQVAE

METRIC_FIELDS = ["step", "epoch", "time_s", "lr", "train_loss", "train_recon", "train_ssim", "perplexity",
                 "usage", "images_per_s", "val_ssim", "val_psnr", "val_mae", "val_ssim_head", "val_psnr_head",
                 "val_usage", "val_perplexity"]


class Interrupted(OasisVQError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130


# --------------------------------------------------------------------------------------------- devices


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (use cpu, cuda, cuda:N or auto)") from None


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA where supported (fp16 otherwise); nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


@contextlib.contextmanager
def distributed_context():
    """Initialise torch.distributed when launched by torchrun; yields (rank, world_size, local_rank)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield (dist.get_rank(), dist.get_world_size(), 0) if dist.is_initialized() else (0, 1, 0)
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    finally:
        dist.destroy_process_group()


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag made true on every rank if it is true on any (one tiny all-reduce under torchrun).

    Decisions that end or break a step (a stop signal, the time budget, a non-finite loss) must be taken by
    all ranks together: a rank that stops alone leaves the others waiting forever in the next all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over all ranks (the values themselves in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(values, t)}


def resume_position(epoch: int, step_in_epoch: int, step: int, n_items: int, saved_global_batch: int,
                    global_batch: int) -> tuple[int, int, int]:
    """A checkpoint's data position (epoch, step in epoch, step) made this run's. A checkpoint written at
    the end of an epoch (before the loop moved on) continues with the next epoch; one written by another
    number of processes (another global batch) continues after the same number of items of its epoch,
    with the step count (which drives learning-rate schedules and epoch budgets) in this run's steps."""
    if step_in_epoch >= n_items // saved_global_batch:
        epoch, step_in_epoch = epoch + 1, 0
    if saved_global_batch != global_batch:
        steps_per_epoch = n_items // global_batch
        step_in_epoch = step_in_epoch * saved_global_batch // global_batch
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        step = epoch * steps_per_epoch + step_in_epoch
    return epoch, step_in_epoch, step


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel that does not broadcast buffers before each forward: every rank already
    holds the same buffers (the quantiser all-reduces its EMA statistics; the priors' are fixed masks)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch >= 2.13 renames the switch; both leave init-time buffers alone or identical.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


# ---------------------------------------------------------------------------------------------- run dir


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    out = Path(out)
    holds_run = (out / "config.json").exists() or (out / "checkpoints").exists()
    if holds_run and not (resume or overwrite):
        raise ConfigError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
    if resume and not (out / "checkpoints" / "last.safetensors").is_file():
        raise ConfigError(f"{out}: nothing to resume (no checkpoints/last.safetensors)")
    if overwrite and holds_run and not resume:
        for sub in ("checkpoints", "figures"):
            for p in (out / sub).glob("*"):
                p.unlink()
        for name in ("metrics.csv", "metrics.json"):
            (out / name).unlink(missing_ok=True)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    for folder in (out, out / "checkpoints", out / "figures"):  # left by a run killed mid-write
        remove_stale_temps(folder)


def load_model(run_dir: Path | str, which: str = "best", device: str | torch.device = "cpu"
               ) -> tuple[VQVAE, RunConfig]:
    """The VQ-VAE of a run folder (``best`` or ``last`` checkpoint, or a path to a checkpoint file)."""
    run_dir = Path(run_dir)
    path = Path(which) if which.endswith(".safetensors") else run_dir / "checkpoints" / f"{which}.safetensors"
    if not path.is_file():
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir}: no such run folder")
        raise CheckpointError(f"{run_dir}: no model checkpoint ({path.name} missing); train one with `oasisvq train`")
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "vqvae" or "config" not in meta:
        raise CheckpointError(f"{path}: not a VQ-VAE checkpoint")
    cfg = RunConfig.from_dict(meta["config"])
    model = VQVAE(cfg.model)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _load_state(model, state, path)
    return model.to(pick_device(str(device)) if isinstance(device, str) else device).eval(), cfg


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if shapes:
            parts.append(f"shape differs: {shapes[:3]}")
        raise CheckpointError(f"{path}: checkpoint does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------- training


def lr_at(progress: float, step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% over the run's budget (``progress`` in [0, 1])."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Left-right flips and mild gamma/contrast jitter (anatomy stays plausible)."""
    n = x.shape[0]
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)  # drawn on the CPU: the same on any device
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-2), x)
    gamma = torch.exp((torch.rand(n, generator=gen) - 0.5) * 0.3).view(n, 1, 1, 1).to(x.device)
    return x.clamp(0, 1).pow(gamma)


@torch.no_grad()
def evaluate_model(model: VQVAE, images: SliceSet, device: torch.device, batch_size: int = 32,
                   amp: bool = False, max_slices: int = 0) -> dict[str, float]:
    """Mean reconstruction metrics and code use of ``model`` over (a fixed, evenly spaced subset of) a set."""
    n = len(images)
    idx = np.arange(n) if not max_slices or n <= max_slices else np.linspace(0, n - 1, max_slices).astype(int)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts = torch.zeros(model.cfg.num_codes, dtype=torch.float64)
    ctx, _ = autocast_for(device, amp)
    for start in range(0, len(idx), batch_size):
        x = images.tensor(idx[start:start + batch_size]).to(device)
        with ctx:
            codes = model.encode(x)
            recon = model.decode_indices(codes)
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.cfg.num_codes).double()
        for k, v in reconstruction_metrics(x, recon.float()).items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    model.train(was_training)
    out = {k: v / len(idx) for k, v in sums.items()}
    p = counts[counts > 0] / counts.sum()
    out["usage"] = float((counts > 0).double().mean())
    out["perplexity"] = float(torch.exp(-(p * p.log()).sum()))
    out["code_counts"] = counts.numpy()
    return out


def compile_decision(mode: str, world: int, device: torch.device, max_minutes: float, total_steps: int
                     ) -> tuple[bool, str]:
    """Whether to torch.compile the VQ-VAE, and why not where it cannot be.

    Compiling pays back its ~10 s within ~20 steps on a 2-core CPU (benchmarks/speed.py: 1.5x per step for
    the cpu preset), so ``auto`` compiles runs of a minute or 100 steps and more. Never under DDP (not
    measured there yet) nor on a CPU without the C++ compiler inductor needs."""
    if mode == "off":
        return False, ""
    if world > 1:
        return False, "not measured under DDP yet"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return False, "no C++ compiler found (inductor needs one on a CPU)"
    return mode == "on" or max_minutes >= 1 or total_steps >= 100, ""


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks once per step (the main thread only)."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C means stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: RunConfig, out: Path | str, resume: bool = False, overwrite: bool = False,
          cache_dir: Path | str | None = None, progress: bool = True, skip_bad: bool = False,
          _fault_at_step: int | None = None) -> dict:
    """Train a VQ-VAE as ``cfg`` says, into the run folder ``out``. Returns the final validation metrics.

    ``skip_bad`` skips unreadable data files (each is named in a warning) instead of stopping.
    ``_fault_at_step`` injects a NaN loss at that step (tests of the NaN guard only)."""
    out = Path(out)
    with distributed_context() as (rank, world, local_rank):
        if resume:
            saved = load_checkpoint(out / "checkpoints" / "last.safetensors")[1]
            on_disk = RunConfig.from_dict(saved["config"])
            _check_resume_config(cfg, on_disk, out)
            cfg = on_disk if cfg is None else _merge_budget(on_disk, cfg)
        cfg.validate()
        if rank == 0:
            prepare_run_dir(out, resume, overwrite)
            cfg.save(out / "config.json")
        if world > 1:
            dist.barrier()
        device = pick_device(cfg.train.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        return _Trainer(cfg, out, device, rank, world, cache_dir, progress, _fault_at_step,
                        skip_bad).run(resume)


def _check_resume_config(new: RunConfig | None, old: RunConfig, out: Path) -> None:
    if new is None:
        return
    diffs = [f"{sec}.{k}: {getattr(getattr(old, sec), k)!r} -> {v!r}"
             for sec in ("data", "model") for k, v in asdict(getattr(new, sec)).items()
             if getattr(getattr(old, sec), k) != v]
    if diffs:
        raise ConfigError(f"{out}: cannot resume with a different data/model config ({'; '.join(diffs[:4])})")


def _merge_budget(old: RunConfig, new: RunConfig) -> RunConfig:
    """On resume only the budget may change (more epochs or minutes)."""
    old.train.epochs, old.train.max_minutes = new.train.epochs, new.train.max_minutes
    return old


class _Trainer:
    def __init__(self, cfg: RunConfig, out: Path, device: torch.device, rank: int, world: int,
                 cache_dir, progress: bool, fault_at_step: int | None, skip_bad: bool = False):
        self.cfg, self.out, self.device, self.rank, self.world = cfg, out, device, rank, world
        self.progress = progress and rank == 0
        self.fault_at_step = fault_at_step
        torch.manual_seed(cfg.train.seed)
        data = load_slices(cfg.data, cache_dir=cache_dir, skip_bad=skip_bad, progress=self.progress)
        if rank == 0:
            for problem in data.index.get("skipped", []):
                warnings.warn(f"skipped unreadable file: {problem}", stacklevel=2)
        self.train_set = data.split("train")
        self.val_set = data.split("validate")
        if len(self.train_set) < cfg.train.batch_size * world:
            raise ConfigError(
                f"batch size {cfg.train.batch_size} x {world} process(es) is larger than the training split "
                f"({len(self.train_set)} slices)")
        self.model = VQVAE(cfg.model).to(device).to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                     betas=(0.9, 0.99))
        self.autocast, amp_dtype = autocast_for(device, cfg.train.amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # The quantiser synchronises its own buffers (all-reduced EMA statistics).
        self.ddp = wrap_ddp(self.model, device) if world > 1 else None
        self.global_batch = cfg.train.batch_size * world
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch if cfg.train.epochs > 0 else 0
        if self._should_compile():
            self.model.compile()  # in place: state_dict keys (and checkpoints) stay the same
        self.step = self.epoch = self.step_in_epoch = 0
        self.elapsed = 0.0
        self.best = -1.0
        self.rows: list[dict] = []
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed + 1)

    def _should_compile(self) -> bool:
        use, why_not = compile_decision(self.cfg.train.compile, self.world, self.device,
                                        self.cfg.train.max_minutes, self.total_steps)
        if why_not and self.cfg.train.compile == "on" and self.rank == 0:
            warnings.warn(f"train.compile=on ignored: {why_not}", stacklevel=3)
        return use

    # ------------------------------------------------------------------ checkpoints
    def _save(self, name: str) -> None:
        if self.rank != 0:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_t, opt_meta = optimizer_to_tensors(self.opt)
        tensors.update(opt_t)
        tensors.update(rng_state())
        tensors["rng.augment"] = self.aug_gen.get_state()
        meta = {"kind": "vqvae", "oasisvq_version": __version__, "config": self.cfg.to_dict(),
                "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "elapsed_s": self.elapsed, "best_val_ssim": self.best, "optimizer": opt_meta,
                "metrics_rows": len(self.rows), "global_batch": self.global_batch, "world_size": self.world}
        if self.scaler is not None:
            meta["scaler"] = self.scaler.state_dict()
        save_checkpoint(self.out / "checkpoints" / f"{name}.safetensors", tensors, meta)

    def _restore(self) -> None:
        tensors, meta = load_checkpoint(self.out / "checkpoints" / "last.safetensors")
        _load_state(self.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                    self.out / "checkpoints" / "last.safetensors")
        optimizer_from_tensors(self.opt, tensors, meta["optimizer"])
        set_rng_state(tensors)
        self.aug_gen.set_state(tensors["rng.augment"])
        if self.scaler is not None and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.epoch, self.step_in_epoch = meta["step"], meta["epoch"], meta["step_in_epoch"]
        self.epoch, self.step_in_epoch, self.step = resume_position(
            self.epoch, self.step_in_epoch, self.step, len(self.train_set),
            int(meta.get("global_batch", self.global_batch)), self.global_batch)
        self.elapsed, self.best = meta["elapsed_s"], meta["best_val_ssim"]
        # Rows written after the checkpoint (by a run killed later) belong to steps about to be redone.
        if (self.out / "metrics.csv").is_file():
            with open(self.out / "metrics.csv", newline="") as f:
                self.rows = list(csv.DictReader(f))[: meta["metrics_rows"]]

    def _write_metrics(self) -> None:
        if self.rank != 0:
            return
        atomic_write_csv(self.out / "metrics.csv", self.rows, METRIC_FIELDS)

    # ------------------------------------------------------------------ loop
    def _budget_progress(self) -> float:
        parts = []
        if self.total_steps:
            parts.append(self.step / self.total_steps)
        if self.cfg.train.max_minutes > 0:
            parts.append(self.elapsed / (60 * self.cfg.train.max_minutes))
        return max(parts)

    def _batch(self) -> torch.Tensor:
        order = epoch_order(len(self.train_set), self.cfg.train.seed, self.epoch)
        start = self.step_in_epoch * self.global_batch + self.rank * self.cfg.train.batch_size
        # uint8 to the device (a quarter of the bytes of float), from pinned memory on CUDA so the copy
        # overlaps the previous step's work; converted and augmented there.
        u8 = torch.from_numpy(self.train_set.uint8(order[start:start + self.cfg.train.batch_size])).unsqueeze(1)
        if self.device.type == "cuda":
            u8 = u8.pin_memory()
        x = u8.to(self.device, non_blocking=True).float().div_(255.0)
        if self.cfg.train.augment:
            x = augment_batch(x, self.aug_gen)
        return x.contiguous(memory_format=torch.channels_last)

    def run(self, resume: bool) -> dict:
        if resume:
            self._restore()
        self.time_up = self._out_of_time()  # the same on every rank: elapsed comes from the checkpoint
        model = self.ddp or self.model
        model.train()
        evals = sorted({max(1, round(self.steps_per_epoch * (i + 1) / self.cfg.train.evals_per_epoch))
                        for i in range(self.cfg.train.evals_per_epoch)})
        bar = tqdm(total=self.total_steps or None, initial=self.step, disable=not self.progress, unit="step",
                   desc="train", dynamic_ncols=True)
        acc: dict[str, torch.Tensor] = {}
        n_acc = 0
        last = None
        t_seen = time.perf_counter()
        with _StopFlag() as stop:
            while not self._done():
                lr = lr_at(self._budget_progress(), self.step, self.cfg.train.lr, self.cfg.train.warmup_steps)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                x = self._batch()
                with self.autocast:
                    _, losses = model(x)
                loss = losses["loss"]
                if self.fault_at_step is not None and self.step == self.fault_at_step:
                    loss = loss * float("nan")
                (nonfinite,) = agree(not torch.isfinite(loss))
                if nonfinite:
                    raise TrainingError(
                        f"loss became {loss.item()} at step {self.step} (epoch {self.epoch}); the last good "
                        f"checkpoint is kept in {self.out / 'checkpoints'}. Likely causes: learning rate too "
                        f"high (train.lr = {self.cfg.train.lr}) or input outside [0, 1]; lower train.lr and "
                        f"run again with --resume")
                self.opt.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                    self.scaler.step(self.opt)
                    self.scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                    self.opt.step()
                for k in ("loss", "recon", "ssim", "perplexity", "usage"):
                    if k in losses:  # summed on the device: the finiteness check is the step's one host sync
                        acc[k] = acc.get(k, 0.0) + losses[k].detach().float()
                n_acc += 1
                self.step += 1
                self.step_in_epoch += 1
                now = time.perf_counter()
                self.elapsed += now - t_seen
                t_seen = now
                stopping, self.time_up = agree(stop.signal is not None, self._out_of_time())
                bar.update(1)
                if self.progress and self.step % 10 == 0:
                    bar.set_postfix(loss=f"{float(acc['loss']) / n_acc:.4f}", codes=f"{float(acc['usage']) / n_acc:.2f}",
                                    ssim=f"{float(acc.get('ssim', 0)) / n_acc:.3f}", epoch=self.epoch)
                end_of_epoch = self.step_in_epoch >= self.steps_per_epoch
                scheduled = self.step_in_epoch in evals or end_of_epoch or self._done()
                if scheduled or stopping:
                    # A stop between evaluations gets a (cheap) checkpoint without validation; one that lands
                    # on a scheduled evaluation still validates, so the resumed run logs what an
                    # uninterrupted one would.
                    last = self._checkpoint(acc, n_acc, lr, validate=scheduled)
                    acc, n_acc = {}, 0
                    t_seen = time.perf_counter()  # validation and writing are not training time
                if end_of_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                if stopping:
                    bar.close()
                    name = signal.Signals(stop.signal).name if stop.signal is not None else "another rank's signal"
                    raise Interrupted(
                        f"stopped by {name} at step {self.step}; checkpoint saved. Continue with: "
                        f"oasisvq train --out {self.out} --resume")
        bar.close()
        if self.rank == 0:
            self.finish_figures(last)
        return {k: v for k, v in (last or {}).items() if k != "code_counts"}

    def _out_of_time(self) -> bool:
        return self.cfg.train.max_minutes > 0 and self.elapsed >= 60 * self.cfg.train.max_minutes

    def _done(self) -> bool:
        # time_up is this rank's clock until the first step, then the ranks' agreed verdict (see agree)
        return bool(self.total_steps and self.step >= self.total_steps) or self.time_up

    def _checkpoint(self, acc: dict[str, torch.Tensor], n_acc: int, lr: float, validate: bool = True) -> dict | None:
        # Never overwrite a good checkpoint (or log a row) from a model that went non-finite. Every rank
        # holds the same weights, so every rank stops here together.
        bad = [k for k, v in self.model.state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingError(
                f"non-finite values in {', '.join(bad[:3])} after step {self.step} (epoch {self.epoch}); "
                f"nothing was written and the last good checkpoint is kept in {self.out / 'checkpoints'}. "
                f"Likely cause: learning rate too high (train.lr = {self.cfg.train.lr}); lower it and run "
                f"again with --resume")
        train_stats = mean_over_ranks({k: float(v) / max(n_acc, 1) for k, v in acc.items()}, self.device)
        row = {"step": self.step, "epoch": self.epoch, "time_s": round(self.elapsed, 2), "lr": lr,
               "train_loss": train_stats.get("loss"), "train_recon": train_stats.get("recon"),
               "train_ssim": train_stats.get("ssim"), "perplexity": train_stats.get("perplexity"),
               "usage": train_stats.get("usage"),
               "images_per_s": round(self.step * self.global_batch / max(self.elapsed, 1e-9), 2)}
        val = None
        if validate and self.rank == 0:
            val = evaluate_model(self.model, self.val_set, self.device, amp=self.cfg.train.amp,
                                 max_slices=self.cfg.train.val_slices)
            row.update({"val_ssim": val["ssim"], "val_psnr": val["psnr"], "val_mae": val["mae"],
                        "val_ssim_head": val["ssim_head"], "val_psnr_head": val["psnr_head"],
                        "val_usage": val["usage"], "val_perplexity": val["perplexity"]})
            if val["ssim"] > self.best:
                self.best = val["ssim"]
                self.rows.append(row)
                self._save("best")
            else:
                self.rows.append(row)
        elif self.rank == 0:
            self.rows.append(row)
        self._write_metrics()
        self._save("last")
        if self.world > 1:
            dist.barrier()
        return val

    def finish_figures(self, last: dict | None) -> None:
        from .figures import codebook_usage, reconstruction_grid, training_curves

        figs = self.out / "figures"
        training_curves(self.out / "metrics.csv", figs / "training_curves.png", title=f"training ({self.out.name})")
        model, _ = load_model(self.out, "best", self.device)
        n = min(4, len(self.val_set))
        pick = np.linspace(0, len(self.val_set) - 1, n).astype(int)
        x = self.val_set.tensor(pick).to(self.device)
        with torch.no_grad():
            r = model.decode_indices(model.encode(x)).float()
        reconstruction_grid(x[:, 0].cpu().numpy(), r[:, 0].cpu().numpy(), figs / "validation_grid.png",
                            titles=[f"{self.val_set.subjects[i]}" for i in pick])
        if last is not None:
            codebook_usage(last["code_counts"], figs / "codebook_usage.png", title="validation codebook usage")
