"""The tokeniser stage: train a VQ-VAE on slices (through the one loop in training.py), load it, validate it.

A run folder holds ``config.json`` (written first), ``metrics.csv``, ``checkpoints/{last,best}.safetensors``
and ``figures/``. Checkpoints carry the config, optimizer, RNG and data-order position, so ``resume``
continues exactly where the run stopped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, remove_stale_temps
from .config import RunConfig
from .data import SliceSet, load_slices
from .errors import CheckpointError, ConfigError
from .metrics import reconstruction_metrics
from .models import VQVAE
from .training import (
    Budget,
    Position,
    Task,
    autocast_for,
    barrier,
    distributed_context,
    fit,
    load_state,
    pick_device,
    rank_device,
)

METRIC_FIELDS = ["step", "epoch", "time_s", "lr", "train_loss", "train_recon", "train_ssim", "perplexity",
                 "usage", "images_per_s", "val_ssim", "val_psnr", "val_mae", "val_ssim_head", "val_psnr_head",
                 "val_usage", "val_perplexity"]


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
    load_state(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    return model.to(pick_device(str(device)) if isinstance(device, str) else device).eval(), cfg


def lr_at(progress: float, step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% over the run's budget (``progress`` in [0, 1])."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Left-right flips and mild gamma/contrast jitter (anatomy stays plausible)."""
    n = x.shape[0]
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)  # drawn on the CPU: the same on any device
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-2), x)
    gamma = torch.exp((torch.rand(n, generator=gen) - 0.5) * 0.3).view(n, 1, 1, 1).to(x.device)
    return x.clamp(0, 1).pow(gamma)


@torch.no_grad()
def evaluate_model(model: VQVAE, images: SliceSet, device: torch.device, batch_size: int = 32,
                   amp: bool = False, max_slices: int = 0) -> dict[str, Any]:
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
    out: dict[str, Any] = {k: v / len(idx) for k, v in sums.items()}
    p = counts[counts > 0] / counts.sum()
    out["usage"] = float((counts > 0).double().mean())
    out["perplexity"] = float(torch.exp(-(p * p.log()).sum()))
    out["code_counts"] = counts.numpy()
    return out


class _Losses(nn.Module):
    """The VQ-VAE's training losses as the loop's loss module."""

    def __init__(self, model: VQVAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = self.model(x)[1]
        return {k: losses[k] for k in ("loss", "recon", "ssim", "perplexity", "usage") if k in losses}


class VQVAETask(Task):
    best_key, higher_is_better = "val_ssim", True
    metric_fields = METRIC_FIELDS

    def __init__(self, cfg: RunConfig, out: Path, device: torch.device, rank: int, cache_dir, progress: bool,
                 skip_bad: bool):
        self.cfg, self.out, self.device = cfg, out, device
        self.name, self.resume_hint = "train", f"oasisvq train --out {out} --resume"
        self.checkpoint_dir, self.metrics_path = out / "checkpoints", out / "metrics.csv"
        self.lr_hint = f"Likely causes: learning rate too high (train.lr = {cfg.train.lr}) or input outside [0, 1]; " \
                       "lower train.lr"
        torch.manual_seed(cfg.train.seed)
        data = load_slices(cfg.data, cache_dir=cache_dir, skip_bad=skip_bad, progress=progress and rank == 0)
        if rank == 0:
            for problem in data.index.get("skipped", []):
                warnings.warn(f"skipped unreadable file: {problem}", stacklevel=2)
        self.train_set, self.val_set = data.split("train"), data.split("validate")
        self.n_items = len(self.train_set)
        self.model = VQVAE(cfg.model).to(device).to(memory_format=torch.channels_last)
        self.loss_module = _Losses(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                     betas=(0.9, 0.99))
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed + 1)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor]:
        # uint8 to the device (a quarter of the bytes of float), from pinned memory on CUDA so the copy
        # overlaps the previous step's work; converted and augmented there.
        u8 = torch.from_numpy(self.train_set.uint8(idx)).unsqueeze(1)
        if self.device.type == "cuda":
            u8 = u8.pin_memory()
        x = u8.to(self.device, non_blocking=True).float().div_(255.0)
        if self.cfg.train.augment:
            x = augment_batch(x, self.aug_gen)
        return (x.contiguous(memory_format=torch.channels_last),)

    def lr(self, step: int, progress: float) -> float:
        return lr_at(progress, step, self.cfg.train.lr, self.cfg.train.warmup_steps)

    def validate(self) -> dict[str, Any]:
        return {f"val_{k}": v for k, v in evaluate_model(self.model, self.val_set, self.device, amp=self.cfg.train.amp,
                                                         max_slices=self.cfg.train.val_slices).items()}

    def row(self, at: Position, train: dict[str, float], val: dict[str, Any]) -> dict[str, Any]:
        return {"step": at.step, "epoch": at.epoch, "time_s": round(at.elapsed_s, 2), "lr": at.lr,
                "train_loss": train.get("loss"), "train_recon": train.get("recon"), "train_ssim": train.get("ssim"),
                "perplexity": train.get("perplexity"), "usage": train.get("usage"),
                "images_per_s": round(at.items_seen / max(at.elapsed_s, 1e-9), 2),
                **{k: v for k, v in val.items() if k in METRIC_FIELDS}}

    def meta(self) -> dict[str, Any]:
        return {"kind": "vqvae", "config": self.cfg.to_dict()}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"rng.augment": self.aug_gen.get_state()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.aug_gen.set_state(tensors["rng.augment"])

    def finish(self, last_val: dict[str, Any] | None) -> None:
        from .figures import codebook_usage, reconstruction_grid, training_curves

        figs = self.out / "figures"
        training_curves(self.metrics_path, figs / "training_curves.png", title=f"training ({self.out.name})")
        model, _ = load_model(self.out, "best", self.device)
        pick = np.linspace(0, len(self.val_set) - 1, min(4, len(self.val_set))).astype(int)
        x = self.val_set.tensor(pick).to(self.device)
        with torch.no_grad():
            r = model.decode_indices(model.encode(x)).float()
        reconstruction_grid(x[:, 0].cpu().numpy(), r[:, 0].cpu().numpy(), figs / "validation_grid.png",
                            titles=[f"{self.val_set.subjects[i]}" for i in pick])
        if last_val is not None:
            codebook_usage(last_val["val_code_counts"], figs / "codebook_usage.png", title="validation codebook usage")


def train(cfg: RunConfig | None, out: Path | str, resume: bool = False, overwrite: bool = False,
          cache_dir: Path | str | None = None, progress: bool = True, skip_bad: bool = False,
          _fault_at_step: int | None = None) -> dict:
    """Train a VQ-VAE as ``cfg`` says, into the run folder ``out``. Returns the final validation metrics.

    ``cfg`` may be None with ``resume`` (continue as configured on disk). ``skip_bad`` skips unreadable data
    files (each is named in a warning) instead of stopping. ``_fault_at_step`` injects a NaN loss at that
    step (tests of the NaN guard only)."""
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
        barrier(world)
        device = rank_device(cfg.train.device, world, local_rank)
        task = VQVAETask(cfg, out, device, rank, cache_dir, progress, skip_bad)
        t = cfg.train
        budget = Budget(epochs=t.epochs, max_minutes=t.max_minutes, batch_size=t.batch_size, seed=t.seed,
                        evals_per_epoch=t.evals_per_epoch, amp=t.amp, compile=t.compile, max_steps=t.max_steps)
        result = fit(task, budget, resume=resume, rank=rank, world=world, progress=progress,
                     fault_at_step=_fault_at_step)
        return {k[4:]: v for k, v in (result["val"] or {}).items() if k != "val_code_counts"}


def _check_resume_config(new: RunConfig | None, old: RunConfig, out: Path) -> None:
    if new is None:
        return
    diffs = [f"{sec}.{k}: {getattr(getattr(old, sec), k)!r} -> {v!r}"
             for sec in ("data", "model") for k, v in asdict(getattr(new, sec)).items()
             if getattr(getattr(old, sec), k) != v]
    if diffs:
        raise ConfigError(f"{out}: cannot resume with a different data/model config ({'; '.join(diffs[:4])})")


def _merge_budget(old: RunConfig, new: RunConfig) -> RunConfig:
    """On resume only the budget may change (more epochs, minutes or steps)."""
    old.train.epochs, old.train.max_minutes, old.train.max_steps = (new.train.epochs, new.train.max_minutes,
                                                                    new.train.max_steps)
    return old
