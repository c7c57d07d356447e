"""Held-out evaluation of a trained VQ-VAE, beside the non-learned floors, and reconstruction of files.

Every metric is reported over the whole slice (what published OASIS work reports) and inside the head
mask (the honest figure: whole-slice SSIM is inflated by the black background). Two floors sit beside
the model: an all-black image, and area-downsampling to the model's code grid followed by bilinear
upsampling (no learning, no quantisation).
"""

from __future__ import annotations

import gzip
import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import data as data_layer  # looked up at call time: tests stand in their own slices
from ..checkpoint import atomic_write, atomic_write_bytes, atomic_write_csv, atomic_write_text
from ..config import DataConfig
from ..data import fit_to_size, load_volume, read_png, scale_robust, volume_slices
from ..errors import DataError
from ..metrics import down_up, reconstruction_metrics, summarize
from ..tokenizer import load_model
from ..training import pick_device

PER_SLICE_KEYS = ["ssim", "psnr", "mae", "ssim_head", "psnr_head", "mae_head"]


def floor_name(metrics: dict) -> str:
    """The down-f-up floor's key (f: the run's downsampling) in ``evaluate``'s metrics."""
    return next(k for k in metrics["floors"] if k.startswith("down"))


def evaluate(run_dir: Path | str, data: list[str] | None = None, split: str = "test", out: Path | str | None = None,
             which: str = "best", device: str = "auto", batch_size: int = 32, cache_dir: Path | str | None = None,
             progress: bool = True) -> dict:
    """Per-slice and summary metrics of a run's model on a split; writes per_slice.csv, metrics.json, figures."""
    run_dir = Path(run_dir)
    dev = pick_device(device)
    model, cfg = load_model(run_dir, which, dev)
    data_cfg = replace(cfg.data, paths=list(data)) if data else cfg.data
    slices = data_layer.load_slices(data_cfg, cache_dir=cache_dir, progress=progress).split(split)
    out = Path(out) if out else run_dir / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    f = cfg.model.downsample

    rows: list[dict] = []
    counts = torch.zeros(cfg.model.num_codes, dtype=torch.float64)
    for start in tqdm(range(0, len(slices), batch_size), desc=f"evaluate {split}", disable=not progress, leave=False):
        idx = np.arange(start, min(start + batch_size, len(slices)))
        x = slices.tensor(idx).to(dev)
        with torch.no_grad():
            codes = model.encode(x)
            recon = model.decode_indices(codes).float()
        counts += torch.bincount(codes.flatten().cpu(), minlength=cfg.model.num_codes).double()
        m = reconstruction_metrics(x, recon)
        floor = reconstruction_metrics(x, down_up(x, f))
        black = reconstruction_metrics(x, torch.zeros_like(x))
        for j, i in enumerate(idx):
            row = {"subject": slices.subjects[i], "source": slices.sources[i], "slice": int(slices.slice_numbers[i])}
            row.update({k: float(m[k][j]) for k in PER_SLICE_KEYS})
            row.update({f"downup_{k}": float(floor[k][j]) for k in PER_SLICE_KEYS})
            row.update({f"black_{k}": float(black[k][j]) for k in ("ssim", "psnr", "mae")})
            rows.append(row)

    atomic_write_csv(out / "per_slice.csv", rows, list(rows[0]))
    p = counts[counts > 0] / counts.sum()
    bits = (cfg.data.size // f) ** 2 * math.log2(cfg.model.num_codes) / cfg.data.size**2
    model_stats = {k: summarize([r[k] for r in rows]) for k in PER_SLICE_KEYS}
    model_stats["ssim"]["fraction_above_0.6"] = float(np.mean([r["ssim"] > 0.6 for r in rows]))
    model_stats["ssim_head"]["fraction_above_0.6"] = float(np.mean([r["ssim_head"] > 0.6 for r in rows]))
    downup_stats = {k: summarize([r[f"downup_{k}"] for r in rows]) for k in PER_SLICE_KEYS}
    metrics = {
        "run": str(run_dir), "checkpoint": which, "split": split, "data": data_cfg.paths,
        "slices": len(rows), "subjects": len(set(slices.subjects)),
        "image_size": cfg.data.size, "code_grid": cfg.data.size // f, "num_codes": cfg.model.num_codes,
        "bits_per_pixel": bits,
        "model": model_stats,
        "codebook": {"usage": float((counts > 0).double().mean()), "perplexity": float(torch.exp(-(p * p.log()).sum())),
                     "codes_used": int((counts > 0).sum())},
        "floors": {
            f"down{f}x_up": downup_stats,
            "all_black": {k: summarize([r[f"black_{k}"] for r in rows]) for k in ("ssim", "psnr", "mae")},
        },
        "beats_downup_floor": model_stats["ssim"]["mean"] > downup_stats["ssim"]["mean"],
        "beats_downup_floor_in_head": model_stats["ssim_head"]["mean"] > downup_stats["ssim_head"]["mean"],
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    # The figure's three slices are reconstructed again rather than keeping every reconstruction in memory.
    pick = _best_median_worst({i: r["ssim"] for i, r in enumerate(rows)})
    x = slices.tensor(pick).to(dev)
    with torch.no_grad():
        recon = model.decode_indices(model.encode(x)).float()
    _figures(out, rows, pick, x[:, 0].cpu().numpy(), recon[:, 0].cpu().numpy(), metrics, f)
    return metrics


def _best_median_worst(ssims: dict[int, float]) -> list[int]:
    order = sorted(ssims, key=ssims.get)
    if not order:
        return []
    return [order[-1], order[len(order) // 2], order[0]]


def _figures(out: Path, rows: list[dict], pick: list[int], original: np.ndarray, recon: np.ndarray, metrics: dict,
             f: int) -> None:
    from ..figures import histogram, reconstruction_grid

    titles = [f"{label}: SSIM {rows[i]['ssim']:.3f} ({rows[i]['subject']})" for label, i in
              zip(("best", "median", "worst"), pick)]
    reconstruction_grid(original, recon, out / "best_median_worst.png", titles=titles)
    floors = {"model mean": metrics["model"]["ssim"]["mean"],
              f"down-{f}x-up mean": metrics["floors"][f"down{f}x_up"]["ssim"]["mean"],
              "all-black mean": metrics["floors"]["all_black"]["ssim"]["mean"]}
    histogram(np.array([r["ssim"] for r in rows]), out / "ssim_histogram.png", "whole-slice SSIM",
              f"held-out {metrics['split']} slices (n={len(rows)})", markers=floors)


# -------------------------------------------------------------------------------------------- reconstruct


def reconstruct(run_dir: Path | str, inputs: list[str | Path], out: Path | str, which: str = "best",
                device: str = "auto", progress: bool = True) -> list[Path]:
    """Reconstruct PNG slices (8-bit PNG out) and volumes (NIfTI out, slice by slice) under ``out``."""
    dev = pick_device(device)
    model, cfg = load_model(run_dir, which, dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        files += sorted(q for q in p.rglob("*") if q.is_file() and _kind(q)) if p.is_dir() else [p]
    if not files:
        raise DataError(f"no PNG slices or volumes among {', '.join(map(str, inputs))}")
    written = []
    for p in tqdm(files, desc="reconstruct", disable=not progress, leave=False):
        kind = _kind(p)
        if kind is None:
            raise DataError(f"{p}: not a PNG slice or a volume (.nii, .nii.gz, .hdr/.img, .mgz)")
        target = out / (p.name if kind == "png" else _nifti_name(p))
        if kind == "png":
            img = fit_to_size(read_png(p), cfg.data.size)
            rec = encode_decode(model, img[None].astype(np.float32) / 255, dev)[0]
            buf = io.BytesIO()
            Image.fromarray(np.rint(rec * 255).astype(np.uint8)).save(buf, format="PNG")
            atomic_write_bytes(target, buf.getvalue())
        else:
            _reconstruct_volume(model, cfg.data, p, target, dev)
        written.append(target)
    return written


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    if name.endswith(".png"):
        return "png"
    if name.endswith((".nii", ".nii.gz", ".img", ".mgz")):
        return "volume"
    return None


def _nifti_name(p: Path) -> str:
    name = p.name
    for suf in (".nii.gz", ".nii", ".img", ".mgz"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
    return name + "_recon.nii.gz"


@torch.no_grad()
def encode_decode(model, images: np.ndarray, dev: torch.device, batch: int = 32) -> np.ndarray:
    """The VQ-VAE's reconstructions (N, H, W) float of images (N, H, W) float32 in [0, 1], in batches."""
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch])).unsqueeze(1).to(dev)
        out.append(model.decode_indices(model.encode(x))[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def _reconstruct_volume(model, data_cfg: DataConfig, path: Path, target: Path, dev: torch.device) -> None:
    """Every slice of the volume along the run's axis, reconstructed and stacked back in RAS space."""
    import nibabel as nib

    vol = scale_robust(load_volume(path))
    slices = volume_slices(vol, data_cfg.axis)
    h, w = slices.shape[1:]
    size = data_cfg.size
    if h > size or w > size:
        raise DataError(f"{path}: slices of {h}x{w} are larger than the model's {size}x{size}; "
                        "reconstructing resized volumes is not supported")
    fitted = np.stack([fit_to_size(s.astype(np.float32), size) for s in slices])
    rec = encode_decode(model, fitted, dev)
    top, left = (size - h) // 2, (size - w) // 2
    rec = rec[:, top:top + h, left:left + w]
    # invert volume_slices: put the slice axis back
    if data_cfg.axis == "axial":
        rec_vol = np.moveaxis(rec, 0, 2)
    elif data_cfg.axis == "coronal":
        rec_vol = np.moveaxis(np.rot90(rec, k=-1, axes=(1, 2)), 0, 1)
    else:
        rec_vol = np.rot90(rec, k=-1, axes=(1, 2))
    affine = nib.as_closest_canonical(nib.load(str(path))).affine
    img = nib.Nifti1Image(np.ascontiguousarray(rec_vol, dtype=np.float32), affine)
    atomic_write(target, lambda tmp: tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6)))
