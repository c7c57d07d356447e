"""Metrics for generated slices: fidelity, diversity, memorisation, anatomy, speed.

Feature space (``FEATURES_VERSION``): for an image x in [0, 1] of shape (1, H, W),

* the run's VQ-VAE encoder output z = encoder(x), shape (D, h, w), pooled over space per channel as
  its mean and its standard deviation (2 D numbers), then
* an 8-bin histogram of the intensities inside the head (pixels > 0.05), bins of equal width over
  (0.05, 1], as fractions of the head pixels (8 numbers), and the head area as a fraction of the slice.

Before Fréchet distance and KID, every feature is standardised with the mean and standard deviation of
the reference real half (so the histogram and latent parts weigh alike). They are only comparable between runs with the
same VQ-VAE and the same ``FEATURES_VERSION``; the real-versus-real floor computed next to them (one half
of the held-out slices against the other, at the same sample sizes) is the number to read them against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import atomic_write_text
from ..errors import DataError
from ..metrics import ssim, summarize

FEATURES_VERSION = "oasisvq-features-1: vqvae-encoder mean+std per channel, 8-bin head histogram, head area"
HEAD_THRESHOLD = 0.05
HIST_BINS = 8
TISSUES = ("csf", "grey", "white")  # T1 contrast: darkest to brightest


def _as_float_images(x: Any) -> torch.Tensor:
    """(N, 1, H, W) or (N, H, W) tensor/array, uint8 (0..255) or float in [0, 1] -> float32 (N, 1, H, W)."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.dim() == 3:
        t = t[:, None]
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W) or (N, H, W), got {tuple(t.shape)}")
    return t


# ------------------------------------------------------------------------------------------- features


@torch.no_grad()
def features(images: Any, feature_model: torch.nn.Module, batch_size: int = 64) -> np.ndarray:
    """Feature vectors (N, 2 D + 9) as float64, as described in the module docstring."""
    encoder = getattr(feature_model, "encoder", feature_model)
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = _as_float_images(images[i:i + batch_size]).to(device)
        z = encoder(x).float().flatten(2)
        head = x > HEAD_THRESHOLD
        area = head.flatten(1).float().mean(1, keepdim=True)
        edges = torch.linspace(HEAD_THRESHOLD, 1.0, HIST_BINS + 1, device=device)
        b = torch.bucketize(x.clamp(0, 1), edges[1:-1], right=True)  # bin index 0..HIST_BINS-1
        hist = torch.stack([((b == k) & head).flatten(1).sum(1) for k in range(HIST_BINS)], 1).float()
        hist = hist / hist.sum(1, keepdim=True).clamp_min(1)
        out.append(torch.cat([z.mean(2), z.std(2, unbiased=False), hist, area], 1).double().cpu())
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------- fidelity


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two feature vectors per set")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    r1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()  # tr sqrt(S1 S2)
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross, 0.0))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 20, subset_size: int = 100, seed: int = 0
        ) -> tuple[float, float]:
    """Kernel inception distance: unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3; (mean, std)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least two feature vectors per set")
    d, rng, vals = a.shape[1], np.random.default_rng(seed), []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = 1 - np.eye(m)
        vals.append(((kxx * off).sum() + (kyy * off).sum()) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def standardize(ref: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every feature by the reference set's mean and std, so no single feature dominates."""
    mu, sd = ref.mean(0), ref.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [(x - mu) / sd for x in (ref, *others)]


# ------------------------------------------------------------------------------------------ diversity


@torch.no_grad()
def pairwise_ssim_diversity(images: Any, max_pairs: int = 500, seed: int = 0, batch_size: int = 64) -> float:
    """Mean SSIM over distinct pairs (at most ``max_pairs`` random ones). Lower = more diverse."""
    x = _as_float_images(images)
    n = len(x)
    if n < 2:
        return math.nan
    i, j = torch.triu_indices(n, n, offset=1)
    if len(i) > max_pairs:
        pick = torch.randperm(len(i), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        i, j = i[pick], j[pick]
    vals = [ssim(x[i[k:k + batch_size]], x[j[k:k + batch_size]]) for k in range(0, len(i), batch_size)]
    return float(torch.cat(vals).mean())


# ------------------------------------------------------------------------------------------ memorisation


@torch.no_grad()
def nearest_train_ssim(samples: Any, train: Any, factor: int = 4, top: int = 5, chunk: int = 512
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the highest SSIM to any training slice and that slice's index.

    Candidates are the ``top`` training slices nearest in L2 on ``factor``-times area-downsampled images;
    exact full-resolution SSIM is computed on those only. ``train`` may be a uint8 memmap (read in chunks).
    """
    s = _as_float_images(samples)
    s_small = F.avg_pool2d(s, factor).flatten(1)
    best_d = torch.full((len(s), 0), 0.0)
    best_i = torch.zeros((len(s), 0), dtype=torch.long)
    for start in range(0, len(train), chunk):
        t_small = F.avg_pool2d(_as_float_images(train[start:start + chunk]), factor).flatten(1)
        d = torch.cdist(s_small, t_small)
        best_d = torch.cat([best_d, d], 1)
        best_i = torch.cat([best_i, torch.arange(start, start + len(t_small)).expand(len(s), -1)], 1)
        keep = torch.topk(best_d, min(top, best_d.shape[1]), dim=1, largest=False).indices
        best_d, best_i = best_d.gather(1, keep), best_i.gather(1, keep)
    scores = torch.empty(best_i.shape)
    for k in range(best_i.shape[1]):
        cand = _as_float_images(np.stack([np.asarray(train[int(t)]) for t in best_i[:, k]]))
        scores[:, k] = ssim(s, cand)
    top_score, which = scores.max(1)
    return top_score, best_i.gather(1, which[:, None])[:, 0]


def memorisation_report(samples: Any, train: Any, threshold: float = 0.95, **kw: Any) -> dict[str, Any]:
    score, index = nearest_train_ssim(samples, train, **kw)
    copies = (score > threshold).nonzero().flatten()
    return {
        "nearest_train_ssim": summarize(score) | {"max": float(score.max())},
        "threshold": threshold,
        "copies": len(copies),
        "copy_fraction": float(len(copies) / max(len(score), 1)),
        "copied_samples": [{"sample": i, "train_index": int(index[i]), "ssim": float(score[i])}
                           for i in copies.tolist()],
    }


# ------------------------------------------------------------------------------------------ anatomy


def fit_tissue_gmm(values: np.ndarray, k: int = 3, iters: int = 200, max_values: int = 200_000, seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """1-D Gaussian mixture by EM; components sorted by mean. Returns means, variances, weights."""
    x = np.asarray(values, np.float64).ravel()
    if len(x) > max_values:
        x = np.random.default_rng(seed).choice(x, max_values, replace=False)
    mu = np.quantile(x, (np.arange(k) + 0.5) / k)
    var = np.full(k, x.var() / k**2 + 1e-6)
    w = np.full(k, 1.0 / k)
    for _ in range(iters):
        logp = -0.5 * ((x[:, None] - mu) ** 2 / var + np.log(2 * np.pi * var)) + np.log(w)
        r = np.exp(logp - logp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)  # E step: responsibilities (N, k)
        nk = r.sum(0) + 1e-10  # M step
        w, mu = nk / len(x), (r * x[:, None]).sum(0) / nk
        var = (r * (x[:, None] - mu) ** 2).sum(0) / nk + 1e-6
    order = np.argsort(mu)
    return {"means": mu[order], "variances": var[order], "weights": w[order]}


def _assign(values: np.ndarray, gmm: dict[str, np.ndarray]) -> np.ndarray:
    mu, var, w = gmm["means"], gmm["variances"], gmm["weights"]
    logp = -0.5 * ((values[:, None] - mu) ** 2 / var + np.log(2 * np.pi * var)) + np.log(w)
    return logp.argmax(1)


def head_pixels(images: Any) -> np.ndarray:
    x = _as_float_images(images).numpy()
    return x[x > HEAD_THRESHOLD]


def anatomy_stats(images: Any, gmm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: head area (fraction of the slice) and CSF/grey/white fractions of the head."""
    x = _as_float_images(images).numpy()[:, 0]
    out: dict[str, list[float]] = {"head_area": [], **{t: [] for t in TISSUES}}
    for img in x:
        v = img[img > HEAD_THRESHOLD]
        out["head_area"].append(v.size / img.size)
        counts = np.bincount(_assign(v, gmm), minlength=3) if v.size else np.zeros(3)
        for t, c in zip(TISSUES, counts):
            out[t].append(c / max(v.size, 1))
    return {k: np.asarray(v) for k, v in out.items()}


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 1-Wasserstein distance between two empirical 1-D distributions."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


# ------------------------------------------------------------------------------------------ all together


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n // 2], perm[n // 2:]


def evaluate_samples(samples: Any, real_heldout: Any, real_train: Any, feature_model: torch.nn.Module,
                     *, copy_threshold: float = 0.95, samples_per_second: float | None = None,
                     max_pairs: int = 500, seed: int = 0) -> dict[str, Any]:
    """All generation metrics for ``samples`` (N, 1, H, W) in [0, 1] against real slices.

    ``real_heldout`` (slices the VQ-VAE and prior never trained on) is split in halves A and B; the
    samples and half B, subsampled to the same size, are each compared with half A, so the real-vs-real
    "floor" has the same sample-size bias as the sample score. ``real_train`` is searched for copies.
    """
    s, real = _as_float_images(samples), _as_float_images(real_heldout)
    if len(s) < 2 or len(real) < 4:
        raise ValueError("evaluate_samples needs at least 2 samples and 4 held-out real slices")
    if s.shape[-2:] != real.shape[-2:]:
        raise ValueError(f"samples are {tuple(s.shape[-2:])} but real slices {tuple(real.shape[-2:])}")
    ia, ib = _halves(len(real), seed)
    m = min(len(s), len(ib))
    f_s, f_r = features(s, feature_model), features(real, feature_model)
    f_a, f_b, f_s = standardize(f_r[ia], f_r[ib], f_s)
    rng = np.random.default_rng(seed + 1)
    f_s_m, f_b_m = f_s[rng.choice(len(f_s), m, replace=False)], f_b[rng.choice(len(f_b), m, replace=False)]
    kid_s, kid_s_sd = kid(f_s_m, f_a, seed=seed)
    kid_r, kid_r_sd = kid(f_b_m, f_a, seed=seed)

    gmm = fit_tissue_gmm(head_pixels(real), seed=seed)
    an_s, an_r = anatomy_stats(s, gmm), anatomy_stats(real, gmm)
    anatomy = {
        q: {"samples_mean": float(an_s[q].mean()), "real_mean": float(an_r[q].mean()),
            "wasserstein": wasserstein_1d(an_s[q], an_r[q]),
            "floor_wasserstein": wasserstein_1d(an_r[q][ia], an_r[q][ib])}
        for q in an_s
    }
    n_probe = min(len(s), len(real))
    memo = memorisation_report(s, real_train, copy_threshold)
    held_score, _ = nearest_train_ssim(real[:n_probe], real_train)
    memo["heldout_nearest_train_ssim"] = summarize(held_score)  # what "not a copy" looks like
    return {
        "features_version": FEATURES_VERSION,
        "n_samples": len(s), "n_real_heldout": len(real), "n_real_train": len(real_train), "n_compared": m,
        "fidelity": {
            "frechet": frechet_distance(f_s_m, f_a), "frechet_floor": frechet_distance(f_b_m, f_a),
            "kid": kid_s, "kid_std": kid_s_sd, "kid_floor": kid_r, "kid_floor_std": kid_r_sd,
        },
        "diversity": {
            "samples_pairwise_ssim": pairwise_ssim_diversity(s, max_pairs, seed),
            "real_pairwise_ssim": pairwise_ssim_diversity(real, max_pairs, seed),
        },
        "memorisation": memo,
        "anatomy": anatomy,
        "tissue_gmm": {k: v.tolist() for k, v in gmm.items()},
        "samples_per_second": samples_per_second,
    }


# ------------------------------------------------------------------------------------------- evaluation


class _LazySlices:
    """Array-like view of a SliceSet that reads slices only when indexed (train sets can be large)."""

    def __init__(self, slices):
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slices.uint8(np.arange(len(self))[i])
        return self.slices.uint8([int(i)])[0]


def read_sample_pngs(samples_dir: Path | str) -> tuple[np.ndarray, dict[str, Any]]:
    """The sample PNGs of a folder written by :func:`sample` (uint8 N x H x W) and its samples.json."""
    from ..data import read_png

    samples_dir = Path(samples_dir)
    info_path = samples_dir / "samples.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    names = info.get("files") or sorted(p.name for p in samples_dir.glob("sample_*.png"))
    if not names:
        raise DataError(f"{samples_dir}: no sample PNGs (sample_*.png) found")
    paths = [samples_dir / n for n in names]
    for p in paths:
        if p.resolve().parent != samples_dir.resolve():
            raise DataError(f"{info_path}: file name {p.name!r} escapes the samples folder")
    return np.stack([read_png(p) for p in paths]), info


def evaluate_sample_dir(run_dir: Path | str, samples_dir: Path | str, split: str = "test",
                        max_real: int = 1000, copy_threshold: float = 0.95, device: str = "auto",
                        cache_dir: Path | str | None = None, seed: int = 0, progress: bool = True
                        ) -> dict[str, Any]:
    """Generation metrics of the samples in ``samples_dir`` against the run's ``split`` slices (at most
    ``max_real``, a seeded subset) and its training slices; written to ``samples_dir/samples_metrics.json``."""
    from .. import data  # looked up at call time: tests stand in their own slices
    from ..training import load_model, pick_device

    samples, info = read_sample_pngs(samples_dir)
    dev = pick_device(device)
    vq, run_cfg = load_model(run_dir, "best", dev)
    slices = data.load_slices(run_cfg.data, cache_dir, progress=progress)
    held = slices.split(split)
    if samples.shape[1:] != tuple(held.shape):
        raise DataError(f"{samples_dir}: samples are {samples.shape[1:]} but the run's slices {tuple(held.shape)}")
    pick = np.sort(np.random.default_rng(seed).permutation(len(held))[:max_real])
    report = evaluate_samples(samples, held.uint8(pick), _LazySlices(slices.split("train")), vq,
                              copy_threshold=copy_threshold, samples_per_second=info.get("samples_per_second"),
                              seed=seed)
    report["heldout_split"] = split
    report["sampling"] = {k: info.get(k) for k in ("prior", "temperature", "top_k", "seed", "cond", "device")}
    atomic_write_text(Path(samples_dir) / "samples_metrics.json", json.dumps(report, indent=2) + "\n")
    return report
