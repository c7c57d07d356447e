"""Reconstruction metrics: SSIM (Wang et al. 2004), PSNR and MAE, over the whole slice and inside the head.

SSIM uses an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, population
covariances and only windows that fit inside the image. That is scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``
and pytorch-msssim's ``ssim(data_range=1)``; torchmetrics pads borders differently and does not match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIGMA = 1.5
WINDOW = 11  # skimage: 2 * int(3.5 * sigma + 0.5) + 1
K1, K2 = 0.01, 0.03


def _gaussian_window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    r = torch.arange(WINDOW, device=device, dtype=dtype) - WINDOW // 2
    g = torch.exp(-(r**2) / (2 * SIGMA**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of (N, C, H, W)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of images in [0, 1], shape (N, C, H, W) -> (N, C, H-10, W-10)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"ssim needs images of at least {WINDOW}x{WINDOW}, got {tuple(x.shape[-2:])}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    g = _gaussian_window(x.device, dtype)
    c1, c2 = K1**2, K2**2
    mx, my = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mx * mx
    syy = _blur(y * y, g) - my * my
    sxy = _blur(x * y, g) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image: (N, C, H, W) -> (N,)."""
    return ssim_map(x, y).mean(dim=(1, 2, 3))


def head_mask(x: torch.Tensor, threshold: float = 0.05, dilate: int = 3) -> torch.Tensor:
    """Foreground (head) mask of (N, 1, H, W) images: intensity above ``threshold``, dilated ``dilate`` px."""
    m = (x > threshold).float()
    if dilate > 0:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m > 0.5


def _masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    m = m.to(v.dtype)
    return (v * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def reconstruction_metrics(original: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor | None = None
                           ) -> dict[str, torch.Tensor]:
    """Per-image SSIM, PSNR, MAE over the whole slice and inside the head mask (of the original)."""
    original = original.float()
    recon = recon.float().clamp(0, 1)
    if mask is None:
        mask = head_mask(original)
    smap = ssim_map(original, recon)
    crop = (WINDOW - 1) // 2
    inner = mask[..., crop:-crop, crop:-crop]
    err = recon - original
    sq, ab = err**2, err.abs()
    return {
        "ssim": smap.mean(dim=(1, 2, 3)),
        "psnr": psnr_from_mse(sq.mean(dim=(1, 2, 3))),
        "mae": ab.mean(dim=(1, 2, 3)),
        "ssim_head": _masked_mean(smap, inner),
        "psnr_head": psnr_from_mse(_masked_mean(sq, mask)),
        "mae_head": _masked_mean(ab, mask),
    }


def down_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The non-learned floor: area-downsample by ``factor`` and bilinearly upsample back."""
    small = F.avg_pool2d(x, factor)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def summarize(values: list[float] | torch.Tensor) -> dict[str, float]:
    """Mean, std, median, 5th percentile of a list of per-slice values."""
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "p05": math.nan}
    return {
        "mean": t.mean().item(),
        "std": t.std(unbiased=False).item(),
        "median": t.median().item(),
        "p05": torch.quantile(t, 0.05).item(),
    }
