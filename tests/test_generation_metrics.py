"""Generation metrics on inputs whose answer is known."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from oasisvq.evaluation.generation import (
    FEATURES_VERSION,
    anatomy_stats,
    compare,
    dark_lines,
    evaluate_sample_dir,
    evaluate_samples,
    features,
    features_fingerprint,
    fit_tissue_gmm,
    frechet_distance,
    kid,
    level_bins,
    memorisation_report,
    nearest_train_ssim,
    pairwise_ssim_diversity,
    prdc,
    sample_levels,
    standardize,
    two_sample_test,
    uses_oasis,
    wasserstein_1d,
)

from .conftest import shared

# The feature net's weights hash: if a torch release ever draws them differently, features change and
# FEATURES_VERSION must be bumped (numbers are no longer comparable with older ones).
FINGERPRINT = "ceda2761770fdf2c"


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


def _leveled(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ellipse phantoms whose size grows with their level in [0, 1] (as axial slices do, roughly)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    levels = g.uniform(0, 1, n)
    imgs = np.zeros((n, size, size), np.uint8)
    for i, lv in enumerate(levels):
        a = 0.3 + 0.6 * lv
        r = (xx / a) ** 2 + (yy / (a * 1.2)) ** 2
        imgs[i] = np.clip(80 * (r < 1) + 80 * (r < 0.5) + 60 * (r < 0.2) + g.normal(0, 3, r.shape) * (r < 1), 0, 255)
    return imgs, levels


# ------------------------------------------------------------------------------------------- distances


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
    # in the (high-dimensional, rank-deficient) feature space too
    f = standardize(features(_phantoms(12)))[0]
    assert frechet_distance(f, f) == pytest.approx(0, abs=1e-6)


def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    same, _ = kid(a, b)
    shifted, _ = kid(a, b + 1.0)
    assert abs(same) < 0.05
    assert shifted > 10 * max(abs(same), 1e-3)


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8))
    same = prdc(a, a)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["k"] == 5
    assert same["density"] >= 1.0  # every fake sits on a real point, inside its own and neighbours' balls
    far = prdc(a + 100.0, a)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
    # same distribution, different draws: all clearly above zero; k shrinks to fit tiny sets
    b = rng.normal(size=(60, 8))
    mixed = prdc(b, a)
    assert min(mixed["precision"], mixed["recall"], mixed["coverage"]) > 0.5
    assert prdc(a[:3], a[:4])["k"] == 2


# -------------------------------------------------------------------------------------------- features


def test_features_shape_version_and_parts():
    f = features(_phantoms(5))
    assert f.shape == (5, 2 * (16 + 32 + 64 + 64) + 16 + 1 + 16) and f.dtype == np.float64
    hist, area = f[:, 352:368], f[:, 368]
    assert np.allclose(hist.sum(1), 1.0)  # the histogram part is a distribution over head pixels
    half = np.zeros((1, 64, 64), np.uint8)
    half[0, :, :32] = 200  # head = left half of the slice
    assert features(half)[0, 368] == pytest.approx(0.5, abs=0.02) and 0 < area.min() <= area.max() < 1
    assert FEATURES_VERSION.startswith("oasisvq-features-2:")
    assert features_fingerprint() == FINGERPRINT, "the feature net's weights changed: bump FEATURES_VERSION"


def test_features_independent_of_batch_size_input_type_and_global_rng():
    x = _phantoms(7, size=48, seed=3)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = features(x, batch_size=64)
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global RNGs are untouched
    assert all(np.array_equal(u, v) for u, v in zip(np.random.get_state()[1:3], np_state[1:3]))
    np.testing.assert_allclose(features(x, batch_size=2), a, rtol=0, atol=1e-9)
    np.testing.assert_allclose(features(x[:, 0].numpy()), a, rtol=0, atol=1e-12)  # (N, H, W) arrays too
    u8 = (x * 255).round().to(torch.uint8)
    np.testing.assert_allclose(features(u8), features(u8.float() / 255), rtol=0, atol=1e-12)


def test_features_identical_in_a_fresh_process(tmp_path):
    imgs = (_phantoms(6, size=40, seed=9) * 255).round().to(torch.uint8).numpy()
    np.save(tmp_path / "imgs.npy", imgs)
    code = ("import sys, numpy as np, torch; torch.manual_seed(123); np.random.seed(5)\n"
            "from oasisvq.evaluation.generation import features, features_fingerprint\n"
            "np.save(sys.argv[1], features(np.load(sys.argv[2]), batch_size=4)); print(features_fingerprint())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.npy"), str(tmp_path / "imgs.npy")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == features_fingerprint()
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), features(imgs), rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------ two-sample test


def test_two_sample_test_chance_on_one_distribution_and_one_on_blank():
    real = features(_phantoms(80, seed=1))
    a, b = standardize(real[:40], real[40:])
    same = two_sample_test(a, b)
    assert abs(same["accuracy"] - 0.5) < 0.12 and same["n_per_class"] == 40 and same["folds"] == 5
    blank = np.zeros((40, 32, 32), np.uint8)
    r, x = standardize(real[:40], features(blank))
    assert two_sample_test(x, r)["accuracy"] > 0.95


@pytest.fixture(scope="module")
def t88_images():
    """Every real OASIS-1 T88 slice beside the checkout (160 subjects), (N, 256, 256) uint8 in a fixed order."""
    from oasisvq.data import read_png

    root = shared("oasis1_t88_axial")
    paths = sorted(root.glob("*/*.png"))
    if len(paths) < 40:
        pytest.skip(f"{root}: fewer than 40 slices")
    return np.stack([read_png(p) for p in paths])


@pytest.fixture(scope="module")
def t88(t88_images):
    """Features of t88_images."""
    return features(t88_images)


def test_two_sample_test_on_real_slices(t88):
    perm = np.random.default_rng(0).permutation(len(t88))
    half = len(t88) // 2
    a, b = standardize(t88[perm[:half]], t88[perm[half:2 * half]])
    assert abs(two_sample_test(a, b)["accuracy"] - 0.5) < 0.12  # real vs real: cannot tell them apart
    g = np.random.default_rng(1)
    near_blank = np.zeros((40, 256, 256), np.uint8)  # a few specks of "head" on a black slice
    for img in near_blank:
        img[tuple(g.integers(0, 256, (2, 200)))] = g.integers(20, 200, 200)
    for fake in (np.zeros((40, 256, 256), np.uint8), near_blank):
        r, x = standardize(t88[perm[:half]], features(fake))
        assert two_sample_test(x, r)["accuracy"] > 0.95


# ------------------------------------------------------------------------------------------- memorisation


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
    # a near-blank sample beside a near-blank training slice is near-empty, not a copy
    blank_train = torch.cat([train, torch.zeros(1, 1, 32, 32)])
    report = memorisation_report(torch.zeros(1, 1, 32, 32), blank_train)
    assert report["nearest_train_ssim"]["max"] > 0.95
    assert report["copies"] == 0 and report["near_empty_not_counted"] == 1


def test_copy_floor_counts_heldout_slices_that_match_training_slices():
    real, train, samples = _phantoms(24, seed=3), _phantoms(40, seed=4), _phantoms(24, seed=5)
    half_copied = torch.cat([train[:12], real[:12]])  # held-out slices, half of them training slices
    floor = lambda held: evaluate_samples(samples, held, train)["memorisation"]["copy_fraction_floor"]
    assert floor(half_copied) == 0.5
    assert floor(real) == 0.0


# ------------------------------------------------------------------------------------------------ anatomy


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
    assert st["head_intensity"][0] == pytest.approx((50 * 0.2 + 30 * 0.5 + 10 * 0.8) / 90)
    assert anatomy_stats(torch.zeros(1, 1, 4, 4), gmm)["head_intensity"][0] == 0  # an empty slice
    assert wasserstein_1d([0, 1], [0, 1]) == 0
    assert wasserstein_1d([0, 0, 0], [2, 2]) == pytest.approx(2)
    assert wasserstein_1d([0, 1], [0.5]) == pytest.approx(0.5)


def _head_with(marks: str, size: int = 256) -> np.ndarray:
    """A bright disc 'head' (radius 0.8) with thin dark lines, dark dots or nothing inside, (size, size)."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    img = np.where(xx**2 + yy**2 < 0.64, 0.7, 0.0)
    px = 2 / size
    for k in range(-3, 4):  # 7 lines (or 7 rows of dots) 0.1 apart, 2 pixels wide, across the inner head
        near = np.abs(yy - 0.1 * k) < px
        if marks == "lines":
            img = np.where(near & (np.abs(xx) < 0.45), 0.25, img)
        elif marks == "dots":
            img = np.where(near & (np.abs(((xx + 1) % 0.1) - 0.05) < px), 0.25, img)
    return img


def test_dark_lines_count_thin_dark_lines_not_dots_blur_or_size():
    lines, dots, plain = (dark_lines(_head_with(m)) for m in ("lines", "dots", "plain"))
    assert plain == 0 and dark_lines(np.zeros((64, 64))) == 0  # nothing dark inside, or no head at all
    assert lines > 0.1 and dots < lines / 4  # spots are not sulci
    blurred = torch.nn.functional.avg_pool2d(torch.from_numpy(_head_with("lines"))[None, None], 9, 1, 4)[0, 0]
    assert dark_lines(blurred.numpy()) < lines / 5  # a blurred slice loses its sulci
    assert dark_lines(_head_with("lines", 128)) == pytest.approx(lines, rel=0.3)  # scales in 256-pixel units


def test_dark_lines_real_slices_above_their_blurred_copies(t88_images):
    real = t88_images[:24].astype(np.float64) / 255
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(torch.from_numpy(real)[:, None], 8),
                                              scale_factor=8, mode="bilinear")[:, 0].numpy()
    sharp, soft = np.mean([dark_lines(x) for x in real]), np.mean([dark_lines(x) for x in blurred])
    assert sharp > 0.05 and soft < sharp / 3


def test_diversity_lower_for_varied_sets():
    same = _phantoms(1).repeat(4, 1, 1, 1)
    assert pairwise_ssim_diversity(same) == pytest.approx(1.0, abs=1e-6)
    assert pairwise_ssim_diversity(_phantoms(6)) < 0.95


# ---------------------------------------------------------------------------------------------- levels


def test_level_bins_and_sample_levels():
    got = level_bins([0.0, 0.2, 1 / 3, 0.5, 0.99, 1.0, np.nan], np.linspace(0, 1, 4))
    assert got.tolist() == [0, 0, 1, 1, 2, 2, -1]
    levels = sample_levels({"levels": [0.1, None, 0.9]}, 3)
    assert np.isnan(levels[1]) and levels[2] == 0.9
    assert sample_levels({"levels": None}, 3) is None and sample_levels({"levels": [0.5]}, 3) is None


def test_oasis_data_is_recognised_for_the_acknowledgement():
    assert uses_oasis(["/data/OASIS1/disc1"]) and uses_oasis(["x"], ["OAS1_0001"])
    assert not uses_oasis(["oasisvq-demo/data"], ["mni152_z040"])  # the package's own folders are not OASIS


def test_evaluate_samples_end_to_end_and_per_level():
    real, lv_real = _leveled(24, seed=3)
    train, lv_train = _leveled(40, seed=4)
    good, lv_good = _leveled(18, seed=5)
    bad = (np.random.default_rng(0).random((18, 32, 32)) * 80).astype(np.uint8)
    kw = {"heldout_levels": lv_real, "train_levels": lv_train}
    g = evaluate_samples(good, real, train, sample_levels=lv_good, samples_per_second=12.5, **kw)
    b = evaluate_samples(bad, real, train, sample_levels=lv_good, **kw)
    gf, bf = g["fidelity"], b["fidelity"]
    assert gf["frechet"] < bf["frechet"] and gf["kid"] < bf["kid"]
    assert gf["two_sample_accuracy"] < 0.8 < bf["two_sample_accuracy"]
    assert gf["precision"] > bf["precision"] and gf["coverage"] > bf["coverage"]
    assert g["anatomy"]["head_area"]["wasserstein"] < b["anatomy"]["head_area"]["wasserstein"]
    bright = np.where(good > 12, 255, good).astype(np.uint8)  # the same heads with a saturated inside
    w = evaluate_samples(bright, real, train, sample_levels=lv_good, **kw)["anatomy"]["head_intensity"]
    h = g["anatomy"]["head_intensity"]
    assert w["samples_mean"] == pytest.approx(1.0, abs=0.02) and h["samples_mean"] < 0.9
    assert w["wasserstein"] > h["wasserstein"] and w["floor_mean"] == h["floor_mean"]  # the floor ignores samples
    assert g["anatomy"]["dark_lines"]["real_mean"] == b["anatomy"]["dark_lines"]["real_mean"]  # real, not samples
    assert g["samples_per_second"] == 12.5 and g["features_version"] == FEATURES_VERSION
    assert g["n_compared"] == 18 and g["settings"]["two_sample_n_per_class"] == 18
    for q in ("frechet", "kid", "two_sample_accuracy", "precision", "recall", "density", "coverage"):
        assert np.isfinite(gf[f"{q}_floor"]) and gf[f"{q}_floor"] == bf[f"{q}_floor"]  # the floor ignores samples
    assert g["empty"]["samples_fraction"] == 0 and g["empty"]["real_fraction"] == 0
    # per level: three bins, each with as many floor slices as samples (where training has enough)
    bins = g["per_level"]["bins"]
    np.testing.assert_allclose([r["range"] for r in bins], [[0, 1 / 3], [1 / 3, 2 / 3], [2 / 3, 1]])
    assert sum(r["n_samples"] for r in bins) == 18 and sum(r["n_real_heldout"] for r in bins) == 24
    done = [r for r in bins if "skipped" not in r]
    assert done and all(np.isfinite(r["two_sample_accuracy_floor"]) for r in done)
    # nearest real slice: within the sample's level bin
    b_s, b_r = level_bins(lv_good, np.linspace(0, 1, 4)), level_bins(lv_real, np.linspace(0, 1, 4))
    assert all(b_r[j] == b_s[i] for i, j in enumerate(g["nearest_real"]["real_index"]))
    json.dumps(g)  # the report must be JSON-serialisable

    # without levels the per-level part is skipped with its reason; blank samples count as empty
    blank = evaluate_samples(np.zeros((6, 32, 32), np.uint8), real, train)
    assert "no level" in blank["per_level"]["skipped"] and "bins" not in blank["per_level"]
    assert blank["empty"]["samples_fraction"] == 1.0 and blank["fidelity"]["two_sample_accuracy"] > 0.9
    no_pos = evaluate_samples(good, real, train, sample_levels=lv_good)
    assert "no position" in no_pos["per_level"]["skipped"]


def test_feature_groups_name_what_tells_samples_apart():
    """Noise of the same strength but coarser grain leaves the intensities alone and changes the power
    spectrum: the spectrum alone tells the two apart, the head histogram alone cannot."""
    g = torch.Generator().manual_seed(0)
    noisy = lambda heads, grain: (heads + 0.04 * grain(torch.randn(heads.shape, generator=g)) * (heads > 0)).clamp(0, 1)
    fine = lambda n: n
    coarse = lambda n: 3 * torch.nn.functional.avg_pool2d(n, 3, stride=1, padding=1)  # 3x3 means, same std
    real, fresh, grainy = (noisy(_phantoms(48, 128, seed=1), fine), noisy(_phantoms(48, 128, seed=2), fine),
                           noisy(_phantoms(48, 128, seed=3), coarse))
    f_r, f_fresh, f_grainy = standardize(features(real), features(fresh), features(grainy))
    same, other = compare(f_fresh, f_r), compare(f_grainy, f_r)
    assert other["two_sample_spectrum"] > 0.9 and other["two_sample_intensity"] < 0.75
    assert all(same[f"two_sample_{g}"] < 0.75 for g in ("net", "intensity", "spectrum"))


def test_decoded_floor_is_the_floor_through_the_tokeniser():
    """A lossless tokeniser's decoded floor is the floor itself; one that blanks every slice is told apart."""
    real, _ = _leveled(24, seed=3)
    train, _ = _leveled(40, seed=4)
    good, _ = _leveled(18, seed=5)
    lossless = evaluate_samples(good, real, train, reconstruct=lambda x: x)["fidelity"]
    blanking = evaluate_samples(good, real, train, reconstruct=torch.zeros_like)["fidelity"]
    for q in ("frechet", "kid", "two_sample_accuracy", "precision", "recall", "density", "coverage"):
        assert lossless[f"{q}_decoded"] == lossless[f"{q}_floor"]
    assert blanking["two_sample_accuracy_decoded"] > 0.9 > blanking["two_sample_accuracy_floor"]
    assert blanking["two_sample_accuracy"] == lossless["two_sample_accuracy"]  # the samples' own numbers stay
    assert "two_sample_accuracy_decoded" not in evaluate_samples(good, real, train)["fidelity"]


def test_evaluate_sample_dir_writes_json_and_figure(tmp_path, monkeypatch):
    from PIL import Image

    from oasisvq.config import DataConfig, RunConfig
    from oasisvq.data import SliceSet

    imgs, pos = _leveled(36, seed=7)
    splits = ["train"] * 24 + ["validate"] * 4 + ["test"] * 8
    data = SliceSet(imgs, {"subjects": [f"OAS1_{i:04d}" for i in range(36)], "sources": ["x"] * 36,
                           "slices": [0] * 36, "splits": splits, "positions": pos.tolist()})
    monkeypatch.setattr("oasisvq.data.load_slices", lambda *a, **kw: data)

    class Lossless(torch.nn.Module):  # the run's tokeniser, standing in: encode then decode gives x back
        encode = decode_indices = staticmethod(lambda x: x)

    monkeypatch.setattr("oasisvq.tokenizer.load_model", lambda run, which, dev: (Lossless(), None))
    run = tmp_path / "run"
    run.mkdir()
    RunConfig(data=DataConfig(paths=["/somewhere/oasis1"], size=32)).save(run / "config.json")
    samples, levels = _leveled(10, seed=8)
    out = tmp_path / "s"
    out.mkdir()
    names = [f"sample_{i:03d}.png" for i in range(10)]
    for name, img in zip(names, samples):
        Image.fromarray(img).save(out / name)
    (out / "samples.json").write_text(json.dumps({"files": names, "levels": levels.tolist(), "prior": "x",
                                                  "samples_per_second": 3.0}))
    report = evaluate_sample_dir(run, out, device="cpu", progress=False)
    saved = json.loads((out / "samples_metrics.json").read_text())
    assert saved["n_samples"] == 10 and saved["n_real_heldout"] == 8 and saved["heldout_split"] == "test"
    assert saved["features_version"] == FEATURES_VERSION and saved["samples_per_second"] == 3.0
    assert len(saved["per_level"]["bins"]) == 3 and sum(b["n_samples"] for b in saved["per_level"]["bins"]) == 10
    for key in ("fidelity", "empty", "diversity", "memorisation", "anatomy", "settings"):
        assert key in saved
    assert saved["nearest_real"]["figure"] == "nearest_real.png" and saved["nearest_real"]["oasis_acknowledged"]
    assert report["fidelity"]["two_sample_accuracy_floor"] == saved["fidelity"]["two_sample_accuracy_floor"]
    assert saved["fidelity"]["two_sample_accuracy_decoded"] == saved["fidelity"]["two_sample_accuracy_floor"]
    with Image.open(out / "nearest_real.png") as im:
        assert im.size[0] > 400
