"""Metrics for generated slices, in a fixed feature space that compares across runs and versions.

Feature space (``FEATURES_VERSION``), identical for every run, machine and process (no download, no
training, float64): an image x in [0, 1] is resized to 128x128 (bilinear, antialiased), then

* a random-weight conv net: 3x3 convolutions of 16, 32, 64, 64 channels (strides 1, 2, 2, 2), each followed
  by ReLU, weights Kaiming-normal and biases N(0, 0.1^2) drawn from seed 0 by a local ``torch.Generator``;
  the maps of every depth are pooled over space as mean and std per channel (352 numbers);
* a 16-bin histogram of the intensities inside the head (pixels > 0.05), bins of equal width over
  (0.05, 1], as fractions of the head pixels; the head area as a fraction of the slice;
* the radially averaged log10 power spectrum in 16 equal bins of spatial frequency (0, 0.5] cycles/pixel.

Every metric standardises the features by the held-out real slices' mean and std. Each is reported beside
its real-vs-real floor: the same metric between slices of the training subjects (a seeded subset of the
same size as the samples) and the held-out subjects. A generator that reproduced its training distribution
perfectly would score the floor, so the gap to the floor is the number to read, not the raw value.

Metrics: Fréchet distance and KID; precision, recall, density and coverage (Naeem et al. 2020, k = 5, the
held-out slices as the real manifold); a classifier two-sample test (L2-regularised logistic regression on
standardised features, k-fold cross-validated accuracy on balanced classes; 0.5 = cannot tell them apart;
also on each feature group alone, to show what tells them apart);
near-empty samples; memorisation (nearest training slice by SSIM); diversity; tissue anatomy. Where both
the samples and the real slices carry a level in the volume, the comparison is repeated per level bin.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..checkpoint import atomic_write_text
from ..errors import CheckpointError, DataError
from ..metrics import ssim, summarize

FEATURES_VERSION = ("oasisvq-features-2: 128x128 bilinear-antialiased input; random conv net (3x3, 16/32/64/64 "
                    "channels, strides 1/2/2/2, ReLU, Kaiming weights from torch seed 0) mean+std per channel at "
                    "every depth; 16-bin head histogram; head area; 16-bin radial log10 power spectrum; float64")
FEATURE_SIZE = 128
NET_LAYERS = ((16, 1), (32, 2), (64, 2), (64, 2))  # (channels, stride)
NET_SEED = 0
HEAD_THRESHOLD = 0.05
HIST_BINS = 8  # the anatomy GMM's view; the feature histogram has FEATURE_HIST_BINS
FEATURE_HIST_BINS = 16
SPECTRUM_BINS = 16
EMPTY_AREA = 0.02  # a sample with less head than this fraction of the slice counts as near-empty
PRDC_K = 5
TWO_SAMPLE_FOLDS, TWO_SAMPLE_REPEATS, TWO_SAMPLE_L2 = 5, 5, 1.0
TWO_SAMPLE_MAX_PER_CLASS = 500  # bounds the classifier's cost; accuracy barely moves beyond a few hundred
LEVEL_BINS = 3
MIN_PER_LEVEL = 4  # samples and real slices a level bin needs to be compared
TISSUES = ("csf", "grey", "white")  # T1 contrast: darkest to brightest
# Dark lines (sulci, ventricle edges): Hessian scales in pixels of a 256-pixel slice, the blob suppression of
# Frangi et al. 1998, the response that counts as a line, and how far inside the head to look (a fraction of
# the head's inradius: leaves out the scalp and the outer skull, which are dark lines in every slice).
DARK_LINE_SIGMAS, DARK_LINE_BLOB, DARK_LINE_THRESHOLD, DARK_LINE_INNER = (1.0, 2.0), 0.5, 0.04, 0.2
_NET_DIMS = 2 * sum(c for c, _ in NET_LAYERS)
# The two-sample test again on each part of the features alone: which of them tells samples from real slices
FEATURE_GROUPS = {"net": slice(0, _NET_DIMS), "intensity": slice(_NET_DIMS, _NET_DIMS + FEATURE_HIST_BINS + 1),
                  "spectrum": slice(_NET_DIMS + FEATURE_HIST_BINS + 1, None)}


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


@functools.lru_cache(maxsize=1)
def _net_weights() -> tuple[tuple[torch.Tensor, torch.Tensor, int], ...]:
    """The random conv net: a local generator, so the global RNG is untouched and every process agrees."""
    g = torch.Generator().manual_seed(NET_SEED)
    layers, c_in = [], 1
    for c_out, stride in NET_LAYERS:
        w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) * math.sqrt(2.0 / (9 * c_in))
        b = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.1
        layers.append((w, b, stride))
        c_in = c_out
    return tuple(layers)


def features_fingerprint() -> str:
    """Hash of the feature net's weights: changes if a torch release ever draws them differently."""
    h = hashlib.sha256()
    for w, b, _ in _net_weights():
        h.update(w.numpy().tobytes())
        h.update(b.numpy().tobytes())
    return h.hexdigest()[:16]


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    """Radially averaged log10 power spectrum of (N, 1, S, S) in SPECTRUM_BINS bins of (0, 0.5] cycles/px."""
    s = x.shape[-1]
    power = torch.fft.fft2(x[:, 0]).abs().pow(2).flatten(1) / s**2
    f = torch.fft.fftfreq(s, dtype=torch.float64, device=x.device)
    r = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).flatten()
    b = torch.ceil(r / 0.5 * SPECTRUM_BINS).long() - 1  # DC -> -1, beyond Nyquist (corners) -> >= BINS
    out = []
    for k in range(SPECTRUM_BINS):
        out.append(power[:, b == k].mean(1))
    return torch.log10(torch.stack(out, 1) + 1e-10)


@torch.no_grad()
def features(images: Any, batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Feature vectors (N, 385) as float64, as described in the module docstring; images (N, [1,] H, W)."""
    device = torch.device(device)
    net = [(w.to(device), b.to(device), s) for w, b, s in _net_weights()]
    edges = torch.linspace(HEAD_THRESHOLD, 1.0, FEATURE_HIST_BINS + 1, dtype=torch.float64, device=device)
    out = []
    for i in range(0, len(images), batch_size):
        x = _as_float_images(images[i:i + batch_size]).to(device, torch.float64)
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
        parts, h = [], x
        for w, b, stride in net:
            h = F.relu(F.conv2d(h, w, b, stride=stride, padding=1))
            parts += [h.mean((2, 3)), h.std((2, 3), unbiased=False)]
        head = x > HEAD_THRESHOLD
        k = torch.bucketize(x, edges[1:-1], right=True)  # bin index 0..FEATURE_HIST_BINS-1
        hist = torch.stack([((k == j) & head).flatten(1).sum(1) for j in range(FEATURE_HIST_BINS)], 1).double()
        hist = hist / hist.sum(1, keepdim=True).clamp_min(1)
        area = head.flatten(1).double().mean(1, keepdim=True)
        out.append(torch.cat([*parts, hist, area, _spectrum(x)], 1).cpu())
    if not out:
        return np.zeros((0, _NET_DIMS + FEATURE_HIST_BINS + 1 + SPECTRUM_BINS))
    return torch.cat(out).numpy()


def standardize(ref: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every feature by the reference set's mean and std, so no single feature dominates."""
    mu, sd = ref.mean(0), ref.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return [(x - mu) / sd for x in (ref, *others)]


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


def _cdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))


def prdc(fake: np.ndarray, real: np.ndarray, k: int = PRDC_K) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) of ``fake`` against ``real`` features.

    Each point's k-nearest-neighbour radius within its own set defines the manifold. ``k`` is lowered to
    fit sets smaller than k + 1 (the value used is returned)."""
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    k = min(k, len(real) - 1, len(fake) - 1)
    if k < 1:
        raise ValueError("precision/recall need at least two feature vectors per set")
    r_real = np.sort(_cdist(real, real), 1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(_cdist(fake, fake), 1)[:, k]
    d = _cdist(fake, real)  # (fake, real)
    inside = d <= r_real[None, :]
    return {"precision": float(inside.any(1).mean()),
            "recall": float((d <= r_fake[:, None]).any(0).mean()),
            "density": float(inside.sum() / (k * len(fake))),
            "coverage": float((d.min(0) <= r_real).mean()), "k": int(k)}


def _logistic_fit(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 30) -> np.ndarray:
    """Weights (d + 1, bias last) minimising mean log-loss + l2 / 2 |w|^2 by Newton's method."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    reg = np.full(xa.shape[1], l2)
    reg[-1] = 1e-6  # the bias is (almost) not penalised
    w = np.zeros(xa.shape[1])
    for _ in range(iters):
        p = 0.5 * (1 + np.tanh(xa @ w / 2))  # a sigmoid that cannot overflow
        grad = xa.T @ (p - y) / len(x) + reg * w
        hess = (xa.T * (p * (1 - p))) @ xa / len(x) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-7:
            break
    return w


def two_sample_test(fake: np.ndarray, real: np.ndarray, folds: int = TWO_SAMPLE_FOLDS,
                    repeats: int = TWO_SAMPLE_REPEATS, l2: float = TWO_SAMPLE_L2, seed: int = 0
                    ) -> dict[str, float]:
    """Classifier two-sample test: cross-validated accuracy of a fixed classifier telling ``fake`` from
    ``real`` features; 0.5 = indistinguishable, 1.0 = always told apart.

    Both classes are subsampled to the smaller size (balanced, so chance is exactly 0.5). The classifier is
    L2-regularised logistic regression on features standardised by each training fold; a strong, fixed
    penalty keeps it from fitting noise when there are fewer slices than features. Mean and std over
    ``repeats`` seeded subsamples and fold assignments."""
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    n = min(len(fake), len(real), TWO_SAMPLE_MAX_PER_CLASS)
    folds = min(folds, n)
    if folds < 2:
        raise ValueError("the two-sample test needs at least two feature vectors per set")
    rng, accs = np.random.default_rng(seed), []
    for _ in range(repeats):
        x = np.concatenate([fake[rng.choice(len(fake), n, replace=False)],
                            real[rng.choice(len(real), n, replace=False)]])
        y = np.repeat([1.0, 0.0], n)
        fold = np.concatenate([rng.permutation(n) % folds, rng.permutation(n) % folds])  # stratified
        correct = 0
        for f in range(folds):
            tr, te = fold != f, fold == f
            x_tr, x_te = standardize(x[tr], x[te])
            w = _logistic_fit(x_tr, y[tr], l2)
            correct += int((((x_te @ w[:-1] + w[-1]) > 0) == (y[te] > 0.5)).sum())
        accs.append(correct / (2 * n))
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "n_per_class": n,
            "folds": folds}


def compare(fake: np.ndarray, real: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Every distribution metric of ``fake`` against ``real`` features (both already standardised), and the
    two-sample accuracy on each feature group alone (``two_sample_<group>``)."""
    k, k_sd = kid(fake, real, seed=seed)
    ts = two_sample_test(fake, real, seed=seed)
    pr = prdc(fake, real)
    return {"two_sample_accuracy": ts["accuracy"], "two_sample_accuracy_std": ts["accuracy_std"],
            **{f"two_sample_{g}": two_sample_test(fake[:, cols], real[:, cols], seed=seed)["accuracy"]
               for g, cols in FEATURE_GROUPS.items()},
            **{q: pr[q] for q in ("precision", "recall", "density", "coverage")},
            "frechet": frechet_distance(fake, real), "kid": k, "kid_std": k_sd}


def with_floor(fake: np.ndarray, floor: np.ndarray, real: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """:func:`compare` of the samples and of the real-vs-real floor set, as ``metric`` / ``metric_floor``."""
    s, f = compare(fake, real, seed), compare(floor, real, seed)
    out: dict[str, Any] = {}
    for q in s:
        out[q], out[f"{q}_floor"] = s[q], f[q]
    return out


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
    """Samples within SSIM ``threshold`` of a training slice. Near-empty samples (less head than EMPTY_AREA
    of the slice) are not counted as copies: two near-blank slices score high whatever a model learned, and
    the near-empty share already counts them."""
    score, index = nearest_train_ssim(samples, train, **kw)
    has_head = torch.from_numpy(head_area(samples) >= EMPTY_AREA)
    copies = ((score > threshold) & has_head).nonzero().flatten()
    return {
        "nearest_train_ssim": summarize(score) | {"max": float(score.max())},
        "threshold": threshold,
        "near_empty_not_counted": int((~has_head).sum()),
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


def head_area(images: Any) -> np.ndarray:
    """Per image: the fraction of the slice brighter than HEAD_THRESHOLD (below EMPTY_AREA: near-empty)."""
    return (_as_float_images(images).numpy() > HEAD_THRESHOLD).mean(axis=(1, 2, 3))


def dark_line_map(img: np.ndarray) -> np.ndarray:
    """Per pixel of one (H, W) image in [0, 1]: how strongly it lies on a thin dark line (a sulcus, a
    ventricle's edge), as the largest scale-normalised Hessian eigenvalue where positive, damped where the
    other eigenvalue is as large (a dark spot, not a line), the most over DARK_LINE_SIGMAS."""
    img = np.asarray(img, np.float64)
    best = np.zeros_like(img)
    for sigma in DARK_LINE_SIGMAS:
        s = sigma * img.shape[0] / 256
        hxx = ndimage.gaussian_filter(img, s, order=(0, 2))
        hyy = ndimage.gaussian_filter(img, s, order=(2, 0))
        hxy = ndimage.gaussian_filter(img, s, order=(1, 1))
        half_gap = np.sqrt((hxx - hyy) ** 2 / 4 + hxy**2)
        across, along = (hxx + hyy) / 2 + half_gap, (hxx + hyy) / 2 - half_gap  # across >= along
        blob = np.abs(along) / np.maximum(np.abs(across), 1e-12)
        line = s**2 * np.maximum(across, 0) * np.exp(-(blob**2) / (2 * DARK_LINE_BLOB**2))
        best = np.maximum(best, line)
    return best


def inner_head(img: np.ndarray) -> np.ndarray:
    """The part of the head (filled) farther from its edge than DARK_LINE_INNER of its inradius."""
    depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(img > HEAD_THRESHOLD))
    return depth > DARK_LINE_INNER * depth.max() if depth.max() > 0 else depth > 0


def dark_lines(img: np.ndarray) -> float:
    """The share of the inner head covered by thin dark lines: real slices with sulci score far above
    blurred ones (docs/generation_log.md, "Dark lines: a number for the sulci"); 0 for an empty slice."""
    inner = inner_head(img)
    return float((dark_line_map(img)[inner] > DARK_LINE_THRESHOLD).mean()) if inner.any() else 0.0


def anatomy_stats(images: Any, gmm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: head area (fraction of the slice), mean intensity inside the head (0 for an empty
    slice; the tissue fractions alone hide an over-bright interior, docs/generation_log.md "Decoding
    order"), CSF/grey/white fractions of the head and the share of the inner head on dark lines (sulci)."""
    images = _as_float_images(images)  # once: head_area takes the float tensor as it is
    x = images.numpy()[:, 0]
    out: dict[str, list[float]] = {t: [] for t in ("head_intensity", *TISSUES, "dark_lines")}
    for img in x:
        v = img[img > HEAD_THRESHOLD]
        out["head_intensity"].append(float(v.mean()) if v.size else 0.0)
        counts = np.bincount(_assign(v, gmm), minlength=3) if v.size else np.zeros(3)
        for t, c in zip(TISSUES, counts):
            out[t].append(c / max(v.size, 1))
        out["dark_lines"].append(dark_lines(img))
    return {"head_area": head_area(images), **{k: np.asarray(v) for k, v in out.items()}}


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 1-Wasserstein distance between two empirical 1-D distributions."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


# ------------------------------------------------------------------------------------------ levels


def level_bins(levels: Any, edges: Any) -> np.ndarray:
    """Bin of each level in [0, 1] given bin ``edges``; -1 where the level is unknown (NaN)."""
    lv, edges = np.asarray(levels, np.float64), np.asarray(edges, np.float64)
    b = np.clip(np.searchsorted(edges, lv, side="right") - 1, 0, len(edges) - 2)
    return np.where(np.isfinite(lv), b, -1)


def _level_skip_reason(sample_levels: Any, heldout_levels: Any, train_levels: Any) -> str | None:
    known = lambda v: v is not None and bool(np.isfinite(np.asarray(v, np.float64)).any())
    if not known(sample_levels):
        return "the samples carry no level (samples.json has no 'levels'; a level-conditional prior writes them)"
    if not known(heldout_levels) or not known(train_levels):
        return "the real slices carry no position in their volume (PNG slices have none; volumes do)"
    return None


def nearest_real(f_samples: np.ndarray, f_real: np.ndarray, b_samples: np.ndarray | None = None,
                 b_real: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index and distance of each sample's nearest real slice in feature space, within the sample's level
    bin where both bins are known (-1 = unknown) and that bin holds real slices, else among all."""
    d = _cdist(f_samples, f_real)
    if b_samples is not None and b_real is not None:
        ok = (b_samples[:, None] == b_real[None, :]) & (b_samples[:, None] >= 0)
        d = np.where(ok | ~ok.any(1, keepdims=True), d, np.inf)
    idx = d.argmin(1)
    return idx, d[np.arange(len(d)), idx]


# ------------------------------------------------------------------------------------------ all together


def _take(images: Any, idx: np.ndarray) -> Any:
    """Images at ``idx`` from an array, tensor or :class:`_LazySlices` (N, [1,] H, W)."""
    idx = np.asarray(idx, np.int64)
    if isinstance(images, torch.Tensor):
        return images[torch.from_numpy(idx)]
    return images[idx] if isinstance(images, _LazySlices) else np.asarray(images)[idx]


def evaluate_samples(samples: Any, real_heldout: Any, real_train: Any, *, sample_levels: Any = None,
                     heldout_levels: Any = None, train_levels: Any = None, level_edges: Any = None,
                     copy_threshold: float = 0.95, samples_per_second: float | None = None,
                     max_pairs: int = 500, seed: int = 0, device: str | torch.device = "cpu",
                     reconstruct: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """All generation metrics for ``samples`` (N, 1, H, W) in [0, 1] against real slices.

    ``real_heldout`` are slices of subjects the VQ-VAE and prior never trained on: the real reference.
    ``real_train`` (slices of the training subjects; may be lazily indexed) gives the real-vs-real floor:
    a seeded subset as large as the sample set is measured against the held-out slices exactly like the
    samples, and it is searched for copies. Levels in [0, 1] (NaN = unknown) of each set enable the
    per-level comparison in the bins ``level_edges`` (default: LEVEL_BINS equal bins).

    ``reconstruct`` (images (N, 1, H, W) in [0, 1] -> the tokeniser's encode-then-decode of them) adds the
    *decoded floor* (``fidelity[metric + "_decoded"]``): the floor slices after the tokeniser, rounded to 8
    bits like sampled PNGs. A prior that drew this run's codes exactly as the training slices have them
    would score it, so the gap floor -> decoded floor is the tokeniser's share and decoded floor -> samples
    the prior's.
    """
    s, real = _as_float_images(samples), _as_float_images(real_heldout)
    if len(s) < 2 or len(real) < 4 or len(real_train) < 2:
        raise ValueError("evaluate_samples needs at least 2 samples, 4 held-out and 2 training real slices")
    if s.shape[-2:] != real.shape[-2:]:
        raise ValueError(f"samples are {tuple(s.shape[-2:])} but real slices {tuple(real.shape[-2:])}")
    edges = np.linspace(0, 1, LEVEL_BINS + 1) if level_edges is None else np.asarray(level_edges, np.float64)
    skip = _level_skip_reason(sample_levels, heldout_levels, train_levels)
    rng = np.random.default_rng(seed + 1)
    m = min(len(s), len(real_train))  # the floor set is as large as the (compared) sample set
    pick_s = np.sort(rng.choice(len(s), m, replace=False))
    pick_t = [np.sort(rng.choice(len(real_train), m, replace=False))]
    if skip is None:
        b_s, b_r = level_bins(sample_levels, edges), level_bins(heldout_levels, edges)
        b_t_all = level_bins(train_levels, edges)
        for j in range(len(edges) - 1):  # per-level floor sets: training slices of that level, as many as samples
            cand = np.flatnonzero(b_t_all == j)
            pick_t.append(np.sort(rng.choice(cand, min(int((b_s == j).sum()), len(cand)), replace=False)))
    need = np.unique(np.concatenate(pick_t))
    train_imgs = _as_float_images(_take(real_train, need))
    rows = lambda idx: np.searchsorted(need, idx)

    raw_real = features(real, device=device)
    f_r, f_s, f_t = standardize(raw_real, features(s, device=device), features(train_imgs, device=device))
    fidelity = with_floor(f_s[pick_s], f_t[rows(pick_t[0])], f_r, seed)
    if reconstruct is not None:
        decoded = reconstruct(train_imgs[rows(pick_t[0])]).clamp(0, 1).mul(255).round().div(255)
        f_d = standardize(raw_real, features(decoded, device=device))[1]
        fidelity.update({f"{q}_decoded": v for q, v in compare(f_d, f_r, seed).items()})

    per_level: dict[str, Any] = {"edges": edges.tolist()}
    if skip is not None:
        per_level["skipped"] = skip
    else:
        per_level["bins"] = []
        for j in range(len(edges) - 1):
            fs, fr, ft = f_s[b_s == j], f_r[b_r == j], f_t[rows(pick_t[1 + j])]
            row: dict[str, Any] = {"range": [float(edges[j]), float(edges[j + 1])], "n_samples": len(fs),
                                   "n_real_heldout": len(fr), "n_floor": len(ft)}
            if min(len(fs), len(fr), len(ft)) < MIN_PER_LEVEL:
                row["skipped"] = f"fewer than {MIN_PER_LEVEL} samples, held-out or training slices at this level"
            else:
                row.update(with_floor(fs, ft, fr, seed))
            per_level["bins"].append(row)

    gmm = fit_tissue_gmm(head_pixels(real), seed=seed)
    floor_imgs = train_imgs[rows(pick_t[0])]
    an_s, an_r, an_t = anatomy_stats(s, gmm), anatomy_stats(real, gmm), anatomy_stats(floor_imgs, gmm)
    anatomy = {
        q: {"samples_mean": float(an_s[q].mean()), "real_mean": float(an_r[q].mean()),
            "floor_mean": float(an_t[q].mean()), "wasserstein": wasserstein_1d(an_s[q], an_r[q]),
            "floor_wasserstein": wasserstein_1d(an_t[q], an_r[q])}
        for q in an_s
    }
    memo = memorisation_report(s, real_train, copy_threshold)
    # The floor: held-out slices of other subjects that would count as "copies" (faint vertex slices look
    # alike in every head); a seeded subset as large as the sample set, across all levels.
    probe = real[torch.from_numpy(np.sort(rng.choice(len(real), min(len(s), len(real)), replace=False)))]
    held = memorisation_report(probe, real_train, copy_threshold)
    memo["heldout_nearest_train_ssim"] = held["nearest_train_ssim"]  # what "not a copy" looks like
    memo["copy_fraction_floor"] = held["copy_fraction"]
    near_i, near_d = nearest_real(f_s, f_r, *((b_s, b_r) if skip is None else (None, None)))
    return {
        "features_version": FEATURES_VERSION, "features_fingerprint": features_fingerprint(),
        "n_samples": len(s), "n_real_heldout": len(real), "n_real_train": len(real_train), "n_compared": m,
        "floor": "a seeded subset of training-subject slices, as many as the samples compared, against the "
                 "same held-out slices",
        "fidelity": fidelity,
        "settings": {"prdc_k": PRDC_K, "two_sample_classifier": "L2-regularised logistic regression on features "
                     "standardised per training fold, balanced classes",
                     "two_sample_l2": TWO_SAMPLE_L2, "two_sample_folds": TWO_SAMPLE_FOLDS,
                     "two_sample_repeats": TWO_SAMPLE_REPEATS,
                     "two_sample_n_per_class": min(m, len(real), TWO_SAMPLE_MAX_PER_CLASS)},
        "empty": {"area_threshold": EMPTY_AREA, "samples_fraction": float((an_s["head_area"] < EMPTY_AREA).mean()),
                  "real_fraction": float((an_r["head_area"] < EMPTY_AREA).mean())},
        "per_level": per_level,
        "diversity": {
            "samples_pairwise_ssim": pairwise_ssim_diversity(s, max_pairs, seed),
            "real_pairwise_ssim": pairwise_ssim_diversity(real, max_pairs, seed),
        },
        "memorisation": memo,
        "anatomy": anatomy,
        "tissue_gmm": {k: v.tolist() for k, v in gmm.items()},
        "nearest_real": {"real_index": near_i.tolist(), "distance": near_d.tolist(),
                         "same_level": skip is None},
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
        if isinstance(i, (int, np.integer)):
            return self.slices.uint8([int(i)])[0]
        return self.slices.uint8(np.arange(len(self))[i])  # a slice or an index array


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


def sample_levels(info: dict[str, Any], n: int) -> np.ndarray | None:
    """Level of each sample in [0, 1] from samples.json's ``levels`` (null entries -> NaN), else None."""
    levels = info.get("levels")
    if not isinstance(levels, list) or len(levels) != n:
        return None
    return np.array([math.nan if v is None else float(v) for v in levels])


def uses_oasis(paths: list[str], subjects: Any = ()) -> bool:
    """Whether real slices come from OASIS (a path naming it, or OASIS subject IDs): figures then carry
    the OASIS acknowledgement. "oasisvq" (this package's own folders, e.g. the demo's) does not count."""
    return any(re.search(r"oasis(?!vq)", str(p), re.IGNORECASE) for p in paths) or \
        any(str(s).startswith(("OAS1_", "case_")) for s in subjects)


def nearest_real_figure(samples: np.ndarray, real: np.ndarray, index: Any, distance: Any, path: Path,
                        levels: Any = None, real_levels: Any = None, footer: str | None = None,
                        max_pairs: int = 16) -> Path:
    """Each sample (up to ``max_pairs``) beside its nearest held-out real slice in feature space."""
    from ..figures import slice_grid

    imgs, titles = [], []
    fmt = lambda v: "" if v is None or not np.isfinite(v) else f", level {v:.2f}"
    for i in range(min(max_pairs, len(samples))):
        j = int(index[i])
        imgs += [samples[i], real[j]]
        titles += [f"sample {i}{fmt(None if levels is None else levels[i])}",
                   f"real, d={distance[i]:.1f}{fmt(None if real_levels is None else real_levels[j])}"]
    return slice_grid(np.stack(imgs), path, titles=titles, cols=8, footer=footer,
                      title="samples beside the nearest held-out real slice (fixed feature space)")


def evaluate_sample_dir(run_dir: Path | str, samples_dir: Path | str, split: str = "test",
                        max_real: int = 1000, copy_threshold: float = 0.95, device: str = "auto",
                        cache_dir: Path | str | None = None, seed: int = 0, progress: bool = True,
                        out: Path | str | None = None) -> dict[str, Any]:
    """Generation metrics of the samples in ``samples_dir`` against the run's ``split`` slices (at most
    ``max_real``, a seeded subset) and its training slices, with the floor also through the run's tokeniser
    (the decoded floor, see :func:`evaluate_samples`); written to ``out/samples_metrics.json`` with the
    figure ``out/nearest_real.png`` (``out`` defaults to ``samples_dir``; give one per split to keep both).
    Features run on ``device`` in float64."""
    from .. import data  # looked up at call time: tests stand in their own slices
    from ..config import RunConfig
    from ..download import OASIS_CREDIT
    from ..tokenizer import load_model
    from ..training import pick_device
    from .reconstruction import encode_decode

    run_dir, samples_dir = Path(run_dir), Path(samples_dir)
    out = samples_dir if out is None else Path(out)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.json); train one with `oasisvq train`")
    run_cfg = RunConfig.load(run_dir / "config.json")
    samples, info = read_sample_pngs(samples_dir)
    slices = data.load_slices(run_cfg.data, cache_dir, progress=progress)
    held, train = slices.split(split), slices.split("train")
    if samples.shape[1:] != tuple(held.shape):
        raise DataError(f"{samples_dir}: samples are {samples.shape[1:]} but the run's slices {tuple(held.shape)}")
    pick = np.sort(np.random.default_rng(seed).permutation(len(held))[:max_real])
    levels = sample_levels(info, len(samples))
    real = held.uint8(pick)
    dev = pick_device(device)
    vq, _ = load_model(run_dir, "best", dev)  # the checkpoint sampling decodes with
    reconstruct = lambda x: torch.from_numpy(encode_decode(vq, x[:, 0].numpy(), dev))[:, None]
    report = evaluate_samples(samples, real, _LazySlices(train), sample_levels=levels,
                              heldout_levels=held.position[pick], train_levels=train.position,
                              copy_threshold=copy_threshold, samples_per_second=info.get("samples_per_second"),
                              seed=seed, device=dev, reconstruct=reconstruct)
    oasis = uses_oasis(run_cfg.data.paths, held.subjects)
    footer = f"Real slices: {OASIS_CREDIT}" if oasis else None
    near = report["nearest_real"]
    out.mkdir(parents=True, exist_ok=True)
    nearest_real_figure(samples, real, near["real_index"], near["distance"], out / "nearest_real.png",
                        levels, held.position[pick], footer)
    near.update({"figure": "nearest_real.png", "oasis_acknowledged": oasis})
    report["heldout_split"] = split
    report["sampling"] = {k: info.get(k) for k in ("prior", "temperature", "top_k", "seed", "cond", "level",
                                                   "guidance", "steps", "choice_temperature", "device")}
    atomic_write_text(out / "samples_metrics.json", json.dumps(report, indent=2) + "\n")
    return report
