"""Reconstruction metrics: SSIM agrees with scikit-image and pytorch-msssim on real slices, head-masked
metrics ignore the background, and the down-f-up floor matches the data README's reference numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from oasisvq.metrics import down_up, head_mask, reconstruction_metrics, ssim, ssim_map, summarize

from .conftest import shared


def _t88_test(n: int | None = None) -> torch.Tensor:
    files = sorted(shared("oasis1_t88_axial").joinpath("test").glob("*.png"))[:n]
    assert files, "no t88 test slices"
    arr = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float64) / 255.0 for p in files])
    return torch.from_numpy(arr).unsqueeze(1)


def _degrade(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A blurred, noisy version of x in [0, 1]."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype)
    k = (k[:, None] * k[None, :]) / 256
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.view(1, 1, 5, 5))
    g = torch.Generator().manual_seed(seed)
    return (blurred + 0.03 * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)


def test_ssim_matches_scikit_image_on_real_slices():
    from skimage.metrics import structural_similarity

    x = _t88_test(4)
    y = _degrade(x)
    ours = ssim(x, y)
    assert ours.dtype == torch.float64
    for i in range(x.shape[0]):
        ref = structural_similarity(x[i, 0].numpy(), y[i, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1)
        assert abs(float(ours[i]) - ref) < 1e-4, (i, float(ours[i]), ref)
    # the degradation is real but moderate: not a trivially saturated comparison
    assert 0.3 < float(ours.mean()) < 0.95
    # float32 inputs agree with the float64 result too
    assert torch.allclose(ssim(x.float(), y.float()).double(), ours, atol=1e-4)


def test_ssim_matches_pytorch_msssim():
    from pytorch_msssim import ssim as ms_ssim

    x = _t88_test(4).float()
    y = _degrade(x, seed=1)
    ref = ms_ssim(x, y, data_range=1, size_average=False)
    assert torch.allclose(ssim(x, y), ref, atol=1e-4), (ssim(x, y), ref)


def test_ssim_identity_and_shape_errors():
    x = _t88_test(2).float()
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    assert ssim_map(x, x).shape == (2, 1, 246, 246)
    with pytest.raises(ValueError, match="one shape"):
        ssim(x, x[:1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_head_masked_metrics_ignore_background_changes():
    x = _t88_test(3).float()
    y = _degrade(x, seed=2).float()
    base = reconstruction_metrics(x, y)
    mask = head_mask(x)
    frac = mask.float().mean().item()
    assert 0.2 < frac < 0.8, frac  # about 45% of a slice is head
    # change the reconstruction only where the SSIM window cannot reach the head mask (11x11 windows)
    reach = F.max_pool2d(mask.float(), 11, stride=1, padding=5) > 0
    y2 = torch.where(reach, y, torch.full_like(y, 0.5))
    assert (y2 != y).float().mean() > 0.05, "the test should change a real part of the background"
    changed = reconstruction_metrics(x, y2)
    for k in ("ssim_head", "psnr_head", "mae_head"):
        assert torch.allclose(changed[k], base[k], atol=1e-6), k
    for k in ("ssim", "psnr", "mae"):
        assert not torch.allclose(changed[k], base[k], atol=1e-3), k
    assert (changed["ssim"] < base["ssim"]).all()
    # a perfect reconstruction: SSIM 1 both ways, MAE 0
    perfect = reconstruction_metrics(x, x)
    assert torch.allclose(perfect["ssim_head"], torch.ones(3), atol=1e-6)
    assert torch.allclose(perfect["mae_head"], torch.zeros(3))


def test_head_mask_is_threshold_then_dilation():
    x = torch.zeros(1, 1, 20, 20)
    x[0, 0, 10, 10] = 0.5
    m = head_mask(x, threshold=0.05, dilate=3)
    assert m.sum() == 49 and m[0, 0, 7:14, 7:14].all()
    assert head_mask(x, dilate=0).sum() == 1


def test_down_up_floor_matches_reference_numbers():
    x = _t88_test().float()
    assert x.shape == (20, 1, 256, 256)
    s4 = ssim(x, down_up(x, 4)).mean().item()
    s8 = ssim(x, down_up(x, 8)).mean().item()
    black = ssim(x, torch.zeros_like(x)).mean().item()
    # data README: 4x -> 0.88, 8x -> 0.73, all-black -> 0.49
    assert 0.865 < s4 < 0.885, s4
    assert 0.715 < s8 < 0.745, s8
    assert 0.47 < black < 0.51, black
    assert down_up(x, 4).shape == x.shape


def test_psnr_mae_and_summary_on_known_values():
    x = torch.zeros(1, 1, 16, 16)
    y = torch.full_like(x, 0.1)
    m = reconstruction_metrics(x, y, mask=torch.ones_like(x, dtype=torch.bool))
    assert m["mae"].item() == pytest.approx(0.1, abs=1e-6)
    assert m["psnr"].item() == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["median"] == 2.0  # torch.median: lower middle
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert np.isnan(summarize([])["mean"])
