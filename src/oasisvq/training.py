"""The one training loop of oasisvq. Every model (the VQ-VAE, every prior) trains through :func:`fit`.

A model plugs in as a :class:`Task`: it says how to draw a batch, what its losses are, how to validate, what
a metrics row holds and what else a checkpoint carries. The loop owns the rest: device and DDP set-up, the
data order and the exact resume position, the step and time budget, stop signals and non-finite losses
agreed across ranks, autocast, the compile decision, validation cadence, atomic checkpoints (weights,
optimizer, RNG, position, config), the metrics CSV and the progress bar. Under ``torchrun``
(``RANK``/``WORLD_SIZE`` set) the task's loss module is wrapped in DistributedDataParallel, each rank reads
its share of every global batch, and only rank 0 validates and writes.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import inspect
import math
import os
import shutil
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import __version__
from .checkpoint import (
    atomic_write_csv,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .errors import CheckpointError, ConfigError, OasisVQError, TrainingError

SAVE_EVERY_S = 600.0  # a crash between validations loses at most this much work


class Interrupted(OasisVQError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130


# --------------------------------------------------------------------------------------- devices, ranks


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (use cpu, cuda, cuda:N or auto)") from None


def rank_device(name: str, world: int, local_rank: int) -> torch.device:
    """The device of this process: under torchrun on CUDA, the GPU of its local rank."""
    device = pick_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


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
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    except BaseException as e:
        # An error or a stop signal leaves the DDP wrapper alive in the traceback's frames. Freed only after the
        # group is destroyed, its gloo process group deadlocked in its destructor (about 1 run in 7 of the
        # signal test): drop those frames' locals here.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        gc.collect()  # the wrapper's reference cycles, on every path, while the group still exists
        dist.destroy_process_group()


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag made true on every rank if it is true on any (one tiny all-reduce under torchrun).

    Decisions that end or break a step (a stop signal, the time budget, a non-finite loss, a save) must be
    taken by all ranks together: a rank that stops alone leaves the others waiting forever in the next
    all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over all ranks (the values themselves in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(values, t)}


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel that does not broadcast buffers before each forward: every rank already
    holds the same buffers (the quantiser all-reduces its EMA statistics; the priors' are fixed masks)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch >= 2.13 renames the switch; both leave init-time buffers alone or identical.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def resume_position(epoch: int, step_in_epoch: int, step: int, n_items: int, saved_global_batch: int,
                    global_batch: int) -> tuple[int, int, int]:
    """A checkpoint's data position (epoch, step in epoch, step) made this run's. A checkpoint written at
    the end of an epoch continues with the next epoch; one written by another number of processes (another
    global batch) continues after the same number of items of its epoch, with the step count (which drives
    learning-rate schedules and epoch budgets) in this run's steps."""
    if step_in_epoch >= n_items // saved_global_batch:
        epoch, step_in_epoch = epoch + 1, 0
    if saved_global_batch != global_batch:
        steps_per_epoch = n_items // global_batch
        step_in_epoch = step_in_epoch * saved_global_batch // global_batch
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        step = epoch * steps_per_epoch + step_in_epoch
    return epoch, step_in_epoch, step


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def compile_decision(mode: str, world: int, device: torch.device, max_minutes: float, total_steps: int
                     ) -> tuple[bool, str]:
    """Whether to torch.compile the model, and why not where it cannot be.

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


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict`` with one clear line naming the file when the checkpoint does not fit."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        parts = [f"{what} {items[:3]}" for what, items in (("missing", missing), ("unexpected", extra),
                                                            ("shape differs:", shapes)) if items]
        raise CheckpointError(f"{path}: checkpoint does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks once per step (the main thread only)."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
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


# ------------------------------------------------------------------------------------------- the task


@dataclass
class Budget:
    """How long and how a task trains."""

    epochs: int  # total epochs (0: the time budget alone)
    max_minutes: float  # > 0: a time budget
    batch_size: int  # per process
    seed: int  # drives the data order
    evals_per_epoch: int = 1
    amp: bool = True  # autocast on CUDA
    compile: str = "off"  # on | off | auto (see compile_decision)
    minutes_per_call: bool = False  # the time budget counts this call's wall clock, not all training time
    max_steps: int = 0  # > 0: a budget of optimizer steps over the whole run (with epochs: whichever is fewer)


@dataclass
class Position:
    """Where the loop stands, as a task's metrics row sees it."""

    step: int
    epoch: int  # index of the current epoch
    epochs_done: float  # epochs completed, fractional
    elapsed_s: float  # training time so far (validation and writing excluded)
    lr: float
    items_seen: int


class Task:
    """A model as the loop trains it. Subclasses set the attributes and override the methods they need."""

    name: str  # in messages and the progress bar
    model: nn.Module  # what checkpoints hold as model.*
    loss_module: nn.Module  # forward(*batch) -> {"loss": scalar, other scalars to average in the metrics}
    opt: torch.optim.Optimizer
    device: torch.device
    n_items: int  # training items per epoch
    checkpoint_dir: Path  # last.safetensors and best.safetensors
    metrics_path: Path
    metric_fields: list[str]
    best_key: str  # a key of validate()'s result
    higher_is_better: bool
    resume_hint: str  # the command that continues this run
    lr_hint: str  # what to change after a non-finite loss

    def batch(self, idx: np.ndarray) -> tuple:
        """The loss module's inputs for the training items ``idx``, on the device."""
        raise NotImplementedError

    def lr(self, step: int, progress: float) -> float:
        raise NotImplementedError

    def validate(self) -> dict[str, Any]:
        """Validation metrics (rank 0 only)."""
        raise NotImplementedError

    def row(self, at: Position, train: dict[str, float], val: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """JSON-able metadata every checkpoint carries (kind, config): what loading needs."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors beside the model, optimizer and global RNG that exact resume needs."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def finish(self, last_val: dict[str, Any] | None) -> None:
        """Figures once training ends (rank 0 only)."""


# ------------------------------------------------------------------------------------------- the loop


def fit(task: Task, budget: Budget, *, resume: bool = False, rank: int = 0, world: int = 1,
        progress: bool = True, fault_at_step: int | None = None) -> dict[str, Any]:
    """Train ``task`` until its budget is spent or a stop signal arrives; see the module docstring.

    Returns the last validation metrics (``val``), the last metrics row (``row``), the best score, the
    training time and whether the time budget ended it. ``fault_at_step`` makes the loss NaN at that step
    (tests of the NaN guard only)."""
    device, model, opt = task.device, task.model, task.opt
    global_batch = budget.batch_size * world
    steps_per_epoch = task.n_items // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {budget.batch_size} x {world} process(es) is larger than the training "
                          f"split ({task.n_items} items)")
    total_steps = min((n for n in (budget.epochs * steps_per_epoch, budget.max_steps) if n > 0), default=0)
    autocast, amp_dtype = autocast_for(device, budget.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    use_compile, why_not = compile_decision(budget.compile, world, device, budget.max_minutes, total_steps)
    if why_not and budget.compile == "on" and rank == 0:
        warnings.warn(f"compile=on ignored: {why_not}", stacklevel=2)
    if use_compile:
        model.compile()  # in place: state_dict keys (and checkpoints) stay the same
    module = wrap_ddp(task.loss_module, device) if world > 1 else task.loss_module
    progress = progress and rank == 0

    step = epoch = step_in_epoch = 0
    elapsed, best = 0.0, -math.inf if task.higher_is_better else math.inf
    rows: list[dict] = []
    acc: dict[str, Any] = {}  # loss sums since the last row, on the device (no per-step host sync)
    n_acc = 0
    if resume:
        path = task.checkpoint_dir / "last.safetensors"
        tensors, meta = load_checkpoint(path)
        load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
        optimizer_from_tensors(opt, tensors, meta["optimizer"])
        set_rng_state(tensors)
        task.load_extra_state(tensors)
        if scaler is not None and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
        epoch, step_in_epoch, step = resume_position(meta["epoch"], meta["step_in_epoch"], meta["step"],
                                                     task.n_items, int(meta.get("global_batch", global_batch)),
                                                     global_batch)
        elapsed, best = meta["elapsed_s"], meta[f"best_{task.best_key}"]
        acc, n_acc = dict(meta.get("train_sums", {})), int(meta.get("train_steps", 0))
        # Rows written after the checkpoint (by a run killed later) belong to steps about to be redone.
        if task.metrics_path.is_file():
            with open(task.metrics_path, newline="") as f:
                rows = list(csv.DictReader(f))[: meta["metrics_rows"]]

    def check_finite() -> None:
        # Never validate, log or overwrite a good checkpoint from a model that went non-finite. Every rank
        # holds the same weights, so every rank stops here together.
        bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingError(
                f"{task.name}: non-finite values in {', '.join(bad[:3])} after step {step} (epoch {epoch}); "
                f"nothing was written and the last good checkpoint is kept in {task.checkpoint_dir}. "
                f"{task.lr_hint}, then run again with --resume")

    def save(name: str, full: bool) -> None:
        if rank != 0:
            return
        at_end = step_in_epoch >= steps_per_epoch  # saved as the start of the next epoch
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        meta = dict(task.meta(), oasisvq_version=__version__, step=step, epoch=epoch + at_end,
                    step_in_epoch=0 if at_end else step_in_epoch, elapsed_s=elapsed, metrics_rows=len(rows),
                    global_batch=global_batch, world_size=world, **{f"best_{task.best_key}": best})
        if full:
            opt_tensors, meta["optimizer"] = optimizer_to_tensors(opt)
            tensors.update(opt_tensors, **rng_state(), **task.extra_state())
            meta["train_sums"], meta["train_steps"] = {k: float(v) for k, v in acc.items()}, n_acc
            if scaler is not None:
                meta["scaler"] = scaler.state_dict()
        save_checkpoint(task.checkpoint_dir / f"{name}.safetensors", tensors, meta)

    call_start = time.perf_counter()

    def out_of_time() -> bool:
        used = time.perf_counter() - call_start if budget.minutes_per_call else elapsed
        return budget.max_minutes > 0 and used >= 60 * budget.max_minutes

    def budget_progress() -> float:
        parts = [step / total_steps] if total_steps else []
        if budget.max_minutes > 0:
            parts.append(elapsed / (60 * budget.max_minutes))
        return max(parts)

    (time_up,) = agree(out_of_time())  # then the ranks' agreed verdict after every step

    def done() -> bool:
        return bool(total_steps and step >= total_steps) or time_up

    evals = sorted({max(1, round(steps_per_epoch * (i + 1) / budget.evals_per_epoch))
                    for i in range(budget.evals_per_epoch)})
    module.train()
    bar = tqdm(total=total_steps or None, initial=step, disable=not progress, unit="step", desc=task.name,
               dynamic_ncols=True)
    val = None
    lr = 0.0
    order, order_epoch = None, -1
    t_seen = last_save = time.perf_counter()
    with _StopFlag() as stop:
        while not done():
            if order_epoch != epoch:
                order, order_epoch = epoch_order(task.n_items, budget.seed, epoch), epoch
            lr = task.lr(step, budget_progress())
            for g in opt.param_groups:
                g["lr"] = lr
            start = step_in_epoch * global_batch + rank * budget.batch_size
            inputs = task.batch(order[start:start + budget.batch_size])
            with autocast:
                losses = module(*inputs)
            loss = losses["loss"]
            if fault_at_step is not None and step == fault_at_step:
                loss = loss * float("nan")
            (nonfinite,) = agree(not torch.isfinite(loss))  # the step's one host sync
            if nonfinite:
                raise TrainingError(
                    f"{task.name}: loss became {loss.item()} at step {step} (epoch {epoch}); the last good "
                    f"checkpoint is kept in {task.checkpoint_dir}. {task.lr_hint}, then run again with --resume")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            for k, v in losses.items():
                acc[k] = acc.get(k, 0.0) + v.detach().float()
            n_acc += 1
            step, step_in_epoch = step + 1, step_in_epoch + 1
            now = time.perf_counter()
            elapsed, t_seen = elapsed + now - t_seen, now
            stopping, time_up, save_due = agree(stop.signal is not None, out_of_time(),
                                                now - last_save > SAVE_EVERY_S)
            bar.update(1)
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{float(acc['loss']) / n_acc:.4f}", epoch=epoch)
            end_of_epoch = step_in_epoch >= steps_per_epoch
            if step_in_epoch in evals or end_of_epoch or done() or stopping or save_due:
                check_finite()
            if step_in_epoch in evals or end_of_epoch or done():
                # A stop that lands on a scheduled validation still validates, so the resumed run logs what
                # an uninterrupted one would.
                train = mean_over_ranks({k: float(v) / n_acc for k, v in acc.items()}, device)
                acc, n_acc = {}, 0
                if rank == 0:
                    val = task.validate()
                    at = Position(step, epoch, epoch + step_in_epoch / steps_per_epoch, elapsed, lr,
                                  step * global_batch)
                    rows.append(task.row(at, train, val))
                    score = val[task.best_key]
                    if score > best if task.higher_is_better else score < best:
                        best = score
                        save("best", full=False)
                    atomic_write_csv(task.metrics_path, rows, task.metric_fields)
                save("last", full=True)
                barrier(world)
                t_seen = last_save = time.perf_counter()  # validation and writing are not training time
            elif stopping or save_due:
                save("last", full=True)
                t_seen = last_save = time.perf_counter()
            if end_of_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            if stopping:
                bar.close()
                name = signal.Signals(stop.signal).name if stop.signal is not None else "another rank's signal"
                raise Interrupted(f"stopped by {name} at step {step}; checkpoint saved. Continue with: "
                                  f"{task.resume_hint}")
    bar.close()
    if rank == 0 and rows:
        task.finish(val)
    return {"val": val, "row": dict(rows[-1]) if rows else {}, "best": best, "elapsed_s": elapsed,
            "stopped_by_time": time_up, "step": step, "epoch": epoch}
