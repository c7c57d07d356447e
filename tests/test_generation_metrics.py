"""Generation metrics on inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oasisvq.config import ModelConfig
from oasisvq.evaluation.generation import (
    FEATURES_VERSION,
    anatomy_stats,
    evaluate_samples,
    features,
    fit_tissue_gmm,
    frechet_distance,
    kid,
    memorisation_report,
    nearest_train_ssim,
    pairwise_ssim_diversity,
    wasserstein_1d,
)
from oasisvq.models import VQVAE


def _phantoms(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Ellipse 'heads' with three intensity tissues and random size/offset, (n, 1, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        a, b, dx, dy = (0.6 + 0.3 * torch.rand(4, generator=g)).tolist()
        dx, dy = dx - 0.75, dy - 0.75
        r = ((xx - dx * 0.3) / a) ** 2 + ((yy - dy * 0.3) / b) ** 2
        img = torch.where(r < 1, 0.3, 0.0) + torch.where(r < 0.6, 0.3, 0.0) + torch.where(r < 0.25, 0.3, 0.0)
        out[i, 0] = img + 0.02 * torch.randn(size, size, generator=g) * (r < 1)
    return out.clamp(0, 1)


def test_frechet_identical_sets_near_zero_and_shift_grows():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    d_small = frechet_distance(a, a + 0.5)
    d_big = frechet_distance(a, a + 2.0)
    assert d_small == pytest.approx(5 * 0.25, rel=1e-6)  # pure mean shift: |delta mu|^2
    assert d_big > d_small > 0.1
    # covariance term: N(0, I) vs N(0, 4 I) in 1-D has distance (1 - 2)^2 = 1
    x = rng.normal(size=(20000, 1))
    assert frechet_distance(x, 2 * x) == pytest.approx(1.0, rel=0.05)


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    same, _ = kid(a, b)
    shifted, _ = kid(a, b + 1.0)
    assert abs(same) < 0.05
    assert shifted > 10 * max(abs(same), 1e-3)


def test_features_shape_and_version():
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(downsample=4, channels=(8, 8), hidden=8, res_blocks=1, num_codes=16, code_dim=4))
    f = features(_phantoms(5), model)
    assert f.shape == (5, 2 * 4 + 9) and f.dtype == np.float64
    assert np.allclose(f[:, 8:16].sum(1), 1.0)  # the histogram part is a distribution over head pixels
    assert FEATURES_VERSION.startswith("oasisvq-features-")


def test_copy_of_a_training_slice_is_flagged():
    train = _phantoms(40, seed=1)
    samples = torch.cat([train[17:18], _phantoms(3, seed=2)])
    score, index = nearest_train_ssim(samples, (train[:, 0] * 255).round().to(torch.uint8).numpy())
    assert index[0] == 17 and score[0] > 0.99
    report = memorisation_report(samples, train, threshold=0.95)
    assert report["copies"] >= 1
    assert report["copied_samples"][0]["sample"] == 0 and report["copied_samples"][0]["train_index"] == 17
    # a noisy but not copied image is not flagged
    noise = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert memorisation_report(noise, train)["copies"] == 0


def test_gmm_recovers_three_known_means():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.2, 0.03, 3000), rng.normal(0.5, 0.04, 5000), rng.normal(0.8, 0.03, 4000)])
    gmm = fit_tissue_gmm(rng.permutation(x))
    np.testing.assert_allclose(gmm["means"], [0.2, 0.5, 0.8], atol=0.01)
    np.testing.assert_allclose(gmm["weights"], [0.25, 5 / 12, 1 / 3], atol=0.02)
    np.testing.assert_allclose(np.sqrt(gmm["variances"]), [0.03, 0.04, 0.03], atol=0.01)


def test_anatomy_stats_and_wasserstein():
    img = torch.zeros(1, 1, 10, 10)
    img[0, 0, :5, :] = 0.2  # 50 "csf" pixels
    img[0, 0, 5:8, :] = 0.5  # 30 "grey"
    img[0, 0, 8:, :5] = 0.8  # 10 "white"; 10 background
    gmm = {"means": np.array([0.2, 0.5, 0.8]), "variances": np.full(3, 0.01), "weights": np.full(3, 1 / 3)}
    st = anatomy_stats(img, gmm)
    assert st["head_area"][0] == pytest.approx(0.9)
    assert (st["csf"][0], st["grey"][0], st["white"][0]) == pytest.approx((5 / 9, 3 / 9, 1 / 9))
    assert wasserstein_1d([0, 1], [0, 1]) == 0
    assert wasserstein_1d([0, 0, 0], [2, 2]) == pytest.approx(2)
    assert wasserstein_1d([0, 1], [0.5]) == pytest.approx(0.5)


def test_diversity_lower_for_varied_sets():
    same = _phantoms(1).repeat(4, 1, 1, 1)
    assert pairwise_ssim_diversity(same) == pytest.approx(1.0, abs=1e-6)
    assert pairwise_ssim_diversity(_phantoms(6)) < 0.95


def test_evaluate_samples_end_to_end():
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(downsample=4, channels=(8, 8), hidden=8, res_blocks=1, num_codes=16, code_dim=4))
    real, train = _phantoms(20, seed=3), _phantoms(30, seed=4)
    good = evaluate_samples(_phantoms(10, seed=5), real, train, model, samples_per_second=12.5)
    bad = evaluate_samples(torch.rand(10, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.3,
                           real, train, model)
    assert good["fidelity"]["frechet"] < bad["fidelity"]["frechet"]
    assert good["fidelity"]["kid"] < bad["fidelity"]["kid"]
    assert good["anatomy"]["head_area"]["wasserstein"] < bad["anatomy"]["head_area"]["wasserstein"]
    assert good["samples_per_second"] == 12.5 and good["features_version"] == FEATURES_VERSION
    for key in ("frechet_floor", "kid_floor"):
        assert np.isfinite(good["fidelity"][key])
    import json

    json.dumps(good)  # the report must be JSON-serialisable
