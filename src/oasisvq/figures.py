"""Figures in one consistent style: grey for MRI, a perceptually uniform map (magma) for errors."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt
import numpy as np

from .checkpoint import atomic_write_bytes

STYLE = {"font.size": 9, "axes.titlesize": 9, "figure.dpi": 110, "savefig.bbox": "tight",
         "axes.spines.top": False, "axes.spines.right": False}
ERROR_CMAP = "magma"


def save(fig, path: Path) -> Path:
    """Write a figure atomically as PNG and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _grey(ax, img, title: str | None = None) -> None:
    ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.dtype == np.uint8 else 1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)


def slice_grid(images: np.ndarray, path: Path, titles: list[str] | None = None, title: str | None = None,
               cols: int = 8, footer: str | None = None) -> Path:
    """A grid of 2D slices (N, H, W), uint8 or float in [0, 1]."""
    n = len(images)
    cols = min(cols, max(n, 1))
    rows = max(1, -(-n // cols))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows + (0.3 if footer else 0)),
                                 squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i < n:
                _grey(ax, images[i], titles[i] if titles else None)
            else:
                ax.set_axis_off()
        if title:
            fig.suptitle(title)
        if footer:
            fig.text(0.5, -0.01, footer, ha="center", va="top", fontsize=6, wrap=True)
        return save(fig, path)


def reconstruction_grid(original: np.ndarray, recon: np.ndarray, path: Path, titles: list[str] | None = None,
                        footer: str | None = None) -> Path:
    """Rows of original | reconstruction | absolute error, arrays (N, H, W) float in [0, 1]."""
    n = len(original)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n, 3, figsize=(6.0, 2.0 * n + (0.3 if footer else 0)), squeeze=False)
        for i in range(n):
            _grey(axes[i, 0], original[i], ("original" if i == 0 else "") + (f"\n{titles[i]}" if titles else ""))
            _grey(axes[i, 1], recon[i], "reconstruction" if i == 0 else None)
            err = np.abs(recon[i] - original[i])
            im = axes[i, 2].imshow(err, cmap=ERROR_CMAP, vmin=0, vmax=0.25)
            axes[i, 2].set_axis_off()
            if i == 0:
                axes[i, 2].set_title("|error| (0 to 0.25)", fontsize=7)
        fig.colorbar(im, ax=axes[:, 2], fraction=0.05, shrink=0.6)
        if footer:
            fig.text(0.5, 0.0, footer, ha="center", va="top", fontsize=6, wrap=True)
        return save(fig, path)


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        out.append({k: (float(v) if v not in ("", None) else np.nan) for k, v in r.items()})
    return out


def training_curves(metrics_csv: Path, path: Path, title: str = "training") -> Path:
    """Loss (train) and SSIM/PSNR (validation) against step, from a run's metrics.csv."""
    rows = read_metrics_csv(metrics_csv)
    step = np.array([r["step"] for r in rows])
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
        for key, ax, label in (("train_loss", axes[0], "train loss"), ("val_ssim", axes[1], "validation SSIM"),
                               ("val_psnr", axes[2], "validation PSNR (dB)")):
            y = np.array([r.get(key, np.nan) for r in rows])
            ok = np.isfinite(y)
            ax.plot(step[ok], y[ok], marker="o" if ok.sum() < 30 else None, ms=3)
            ax.set_xlabel("step")
            ax.set_title(label)
            ax.grid(alpha=0.3)
        if any("val_ssim_head" in r for r in rows):
            y = np.array([r.get("val_ssim_head", np.nan) for r in rows])
            ok = np.isfinite(y)
            axes[1].plot(step[ok], y[ok], marker="o" if ok.sum() < 30 else None, ms=3, label="inside head")
            axes[1].legend(["whole slice", "inside head"], fontsize=7)
        fig.suptitle(title, y=1.04)  # above the panels' own titles
        return save(fig, path)


def codebook_usage(counts: np.ndarray, path: Path, title: str = "codebook usage") -> Path:
    """Histogram of how often each code is used, codes sorted by frequency."""
    counts = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = max(counts.sum(), 1)
    used = int((counts > 0).sum())
    p = counts[counts > 0] / total
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 2.6))
        ax.bar(np.arange(len(counts)), counts / total, width=1.0, color="#3b6ea5")
        ax.set_xlabel("code (sorted by use)")
        ax.set_ylabel("fraction of positions")
        ax.set_title(f"{title}: {used}/{len(counts)} codes used, perplexity {perplexity:.0f}")
        return save(fig, path)


def histogram(values: np.ndarray, path: Path, xlabel: str, title: str, markers: dict[str, float] | None = None
              ) -> Path:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5, 2.6))
        ax.hist(values, bins=30, color="#3b6ea5", alpha=0.85)
        for (name, x), color in zip((markers or {}).items(), ("#d62728", "#2ca02c", "#ff7f0e", "#9467bd")):
            ax.axvline(x, color=color, ls="--", lw=1.2, label=f"{name} {x:.3f}")
        if markers:
            ax.legend(fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("slices")
        ax.set_title(title)
        return save(fig, path)
