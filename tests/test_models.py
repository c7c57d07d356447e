"""The vector quantiser (gradients, assignment, EMA arithmetic by hand, dead-code restart, fp32 under
autocast, usage statistics) and the VQ-VAE (shapes, encode/decode agreement, shape and config errors)."""

from __future__ import annotations

import math

import pytest
import torch

from oasisvq.config import DataConfig, ModelConfig, RunConfig
from oasisvq.errors import ConfigError
from oasisvq.models import VQVAE
from oasisvq.models.quantizer import VectorQuantizer


def _vq(codebook, decay=0.5, beta=0.25, dead_code_steps=10, eps=1e-5) -> VectorQuantizer:
    cb = torch.as_tensor(codebook, dtype=torch.float32)
    vq = VectorQuantizer(cb.shape[0], cb.shape[1], decay=decay, beta=beta, dead_code_steps=dead_code_steps, eps=eps)
    vq.codebook.copy_(cb)
    vq.ema_sum.copy_(cb)
    vq.ema_count.fill_(1.0)
    vq.initialized.fill_(True)
    return vq


def _grid(vectors) -> torch.Tensor:
    """Rows (M, D) -> an encoding map (1, D, 1, M)."""
    v = torch.as_tensor(vectors, dtype=torch.float32)
    return v.t().reshape(1, v.shape[1], 1, v.shape[0]).contiguous()


# ----------------------------------------------------------------------------------------------- quantiser


def test_straight_through_gradient_is_identity_and_commitment_pulls_to_codes():
    torch.manual_seed(0)
    vq = _vq(torch.randn(8, 4)).eval()
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    q, idx, commit, _ = vq(z)
    g = torch.randn_like(q)
    (q * g).sum().backward()
    assert torch.equal(z.grad, g)  # d quantised / d z = identity
    # the forward value is the code, not z
    assert torch.allclose(q, vq.codebook[idx].permute(0, 3, 1, 2))

    z.grad = None
    q, idx, commit, _ = vq(z)
    commit.backward()
    codes = vq.codebook[idx].permute(0, 3, 1, 2)
    assert torch.allclose(z.grad, 0.25 * 2 * (z.detach() - codes) / z.numel(), atol=1e-7)
    assert commit.item() == pytest.approx(0.25 * ((z.detach() - codes) ** 2).mean().item(), rel=1e-5)


def test_assignment_is_the_nearest_code():
    torch.manual_seed(1)
    vq = _vq(torch.randn(32, 6)).eval()
    z = torch.randn(3, 6, 4, 4)
    _, idx, _, _ = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 6)
    brute = torch.cdist(flat.double(), vq.codebook.double()).argmin(1)
    assert torch.equal(idx.flatten(), brute)
    assert idx.shape == (3, 4, 4)


def test_ema_update_by_hand():
    decay, eps = 0.5, 1e-5
    vq = _vq([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], decay=decay, eps=eps).train()
    rows = [[0.1, 0.1], [0.9, 1.1], [0.2, 0.0]]  # -> codes 0, 1, 0; code 2 unused
    _, idx, _, stats = vq(_grid(rows))
    assert idx.flatten().tolist() == [0, 1, 0]
    counts = torch.tensor([2.0, 1.0, 0.0])
    sums = torch.tensor([[0.3, 0.1], [0.9, 1.1], [0.0, 0.0]])
    ema_count = 0.5 * 1.0 + 0.5 * counts  # [1.5, 1.0, 0.5]
    ema_sum = 0.5 * torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]) + 0.5 * sums
    assert torch.allclose(vq.ema_count, ema_count)
    assert torch.allclose(vq.ema_sum, ema_sum)
    total = 3.0
    smoothed = (ema_count + eps) / (total + 3 * eps) * total  # Laplace smoothing
    expected = ema_sum / smoothed[:, None]
    assert torch.allclose(vq.codebook, expected, atol=1e-6)
    # numerically: code 0 -> (0.15, 0.05) / 1.5 = (0.1, 0.0333); code 2 -> 2.5 / 0.5 = 5.0
    assert vq.codebook[0].tolist() == pytest.approx([0.1, 0.05 / 1.5], abs=1e-4)
    assert vq.codebook[2].tolist() == pytest.approx([5.0, 5.0], abs=1e-3)
    assert vq.steps_unused.tolist() == [0, 0, 1]
    assert stats["usage"].item() == pytest.approx(2 / 3)

    # a second step with the same batch: decay applies again
    vq(_grid(rows))
    ema_count2 = 0.5 * ema_count + 0.5 * counts
    assert torch.allclose(vq.ema_count, ema_count2)
    assert torch.allclose(vq.ema_sum, 0.5 * ema_sum + 0.5 * sums)

    # eval mode changes nothing
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()(_grid(rows))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_first_training_batch_initialises_the_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3).train()
    z = torch.randn(1, 3, 4, 4) + 10  # far from the random init
    vq(z)
    assert bool(vq.initialized)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    # after init from batch rows and one EMA step every code lies in the convex hull of the batch: near 10
    assert (vq.codebook - 10).abs().max() < 3
    # the init picked batch encodings: ema_sum/ema_count started at those rows
    used = vq.steps_unused == 0
    assert used.any()
    d = torch.cdist(vq.codebook, flat).min(1).values
    assert d.max() < 3


def test_dead_codes_are_restarted_from_batch_encodings_and_then_used():
    torch.manual_seed(0)
    vq = _vq([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 50.0]], decay=0.9, dead_code_steps=3).train()
    rows = torch.tensor([[0.0, 0.1], [0.1, 0.0], [1.0, 0.9], [0.9, 1.0], [0.5, 0.4], [0.4, 0.6]])
    for step in range(2):
        _, idx, _, _ = vq(_grid(rows))
        assert set(idx.flatten().tolist()) <= {0, 1}
    assert vq.steps_unused.tolist() == [0, 0, 2, 2]
    vq(_grid(rows))  # third unused step: codes 2 and 3 are dead and re-seeded
    assert vq.steps_unused.tolist() == [0, 0, 0, 0]
    for k in (2, 3):
        # re-seeded exactly at one of the batch's encodings
        assert torch.cdist(vq.codebook[k:k + 1], rows).min() < 1e-6
        assert torch.equal(vq.ema_sum[k], vq.codebook[k])
        assert vq.ema_count[k].item() == 1.0
    _, idx, _, _stats = vq.eval()(_grid(rows))
    used = set(idx.flatten().tolist())
    assert {2, 3} & used, f"revived codes are not used: {used}"
    assert len(used) >= 3


def test_dead_code_restart_raises_usage_on_real_like_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, decay=0.9, dead_code_steps=2).train()
    vq(torch.randn(1, 4, 8, 8))  # init
    vq.codebook[:8] += 100  # break half the codebook: nobody picks these
    vq.ema_sum[:8] = vq.codebook[:8] * vq.ema_count[:8, None]
    for _ in range(4):
        _, _idx, _, stats = vq(torch.randn(1, 4, 8, 8))
    assert (vq.codebook.abs() < 20).all(), "dead codes were not pulled back to the data"
    assert stats["usage"].item() > 0.5


def test_quantiser_runs_fp32_under_bf16_autocast():
    # two codes 0.004 apart near 1: bf16 (8-bit mantissa) cannot tell which is nearer
    vq = _vq([[1.0] * 16, [1.004] * 16]).eval()
    z = _grid([[1.0031] * 16, [1.0009] * 16])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, idx, commit, stats = vq(z)
        # bf16 encodings from an autocast encoder still give fp32 outputs
        q16, _, commit16, _ = vq(z.bfloat16())
    assert idx.flatten().tolist() == [1, 0]
    assert q.dtype == torch.float32 and commit.dtype == torch.float32
    assert q16.dtype == torch.float32 and commit16.dtype == torch.float32
    assert stats["perplexity"].dtype == torch.float32
    # training under autocast keeps fp32 buffers
    vq.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vq(z.bfloat16())
    assert vq.codebook.dtype == torch.float32 and vq.ema_sum.dtype == torch.float32


def test_perplexity_and_usage_on_known_assignments():
    vq = _vq(torch.eye(4) * 10).eval()
    half = _grid([[10, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0], [0, 10, 0, 0]])
    _, idx, _, s = vq(half)
    assert idx.flatten().tolist() == [0, 0, 1, 1]
    assert s["perplexity"].item() == pytest.approx(2.0, rel=1e-5)
    assert s["usage"].item() == pytest.approx(0.5)
    _, _, _, s = vq(_grid(torch.eye(4) * 10))
    assert s["perplexity"].item() == pytest.approx(4.0, rel=1e-5)
    assert s["usage"].item() == 1.0
    _, _, _, s = vq(_grid([[10, 0, 0, 0]] * 3 + [[0, 0, 0, 10]]))  # p = (3/4, 0, 0, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s["perplexity"].item() == pytest.approx(math.exp(h), rel=1e-5)


# ------------------------------------------------------------------------------------------------- VQ-VAE


def _tiny(downsample: int, **kw) -> ModelConfig:
    stages = int(math.log2(downsample))
    base = {"downsample": downsample, "channels": tuple([4] * stages), "hidden": 8, "res_blocks": 1, "num_codes": 16, "code_dim": 4}
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("f", [2, 4, 8, 16])
def test_encode_decode_shapes(f):
    torch.manual_seed(0)
    model = VQVAE(_tiny(f))
    x = torch.rand(2, 1, 32, 48)
    model.train()
    recon, losses = model(x)  # initialises the codebook
    assert recon.shape == x.shape
    assert {"loss", "recon", "commit", "ssim", "perplexity", "usage"} <= set(losses)
    model.eval()
    idx = model.encode(x)
    assert idx.shape == (2, 32 // f, 48 // f) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 16
    out = model.decode_indices(idx)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("preset", ["cpu", "cpu-f8", "cpu-f16"])
def test_initial_model_keeps_the_signal_through_every_preset(preset):
    """At initialisation different slices must encode differently and decode differently: with PyTorch's
    default init the 16x encoder's output spread was about 1e-3 of its input's, and training sat at the
    mean image."""
    from oasisvq.config import model_preset

    torch.manual_seed(0)
    model = VQVAE(model_preset(preset))
    x = torch.rand(4, 1, 64, 64) * torch.rand(4, 1, 1, 1)  # slices of different brightness
    with torch.no_grad():
        z = model.encoder(x)
        recon = model.decoder(z)
    across_slices = lambda t: float(t.mean(dim=(1, 2, 3)).std())  # spread of the per-slice means
    assert across_slices(z) > 0.1 * across_slices(x)
    assert across_slices(recon) > 0.1 * across_slices(x)
    assert float(z.std()) > 0.1 * float(x.std())


def test_decode_of_encode_equals_eval_forward():
    torch.manual_seed(0)
    model = VQVAE(_tiny(4, code_dim=8, num_codes=32))
    x = torch.rand(3, 1, 32, 32)
    model.train()
    for _ in range(2):
        model(x)
    model.eval()
    with torch.no_grad():
        recon, _ = model(x)
        again = model.decode_indices(model.encode(x))
    assert torch.allclose(again, recon.clamp(0, 1), atol=1e-6)


def test_bad_shapes_raise_clear_value_errors():
    model = VQVAE(_tiny(4)).eval()
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model.encode(torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        model.encode(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        model.decode_indices(torch.zeros(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode_indices(torch.full((1, 8, 8), 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode_indices(torch.full((1, 8, 8), -1, dtype=torch.long))


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="does not divide the image size 40"):
        _tiny(16).validate(image_size=40)
    _tiny(8).validate(image_size=40)  # 8 divides 40
    with pytest.raises(ConfigError, match="multiple of 16"):
        RunConfig(data=DataConfig(size=40), model=_tiny(8)).validate()
    with pytest.raises(ConfigError, match="2, 4, 8 or 16"):
        ModelConfig(downsample=3).validate()
    with pytest.raises(ConfigError, match="one width per stride-2 stage"):
        ModelConfig(downsample=8, channels=(8, 8)).validate()
    with pytest.raises(ConfigError, match="decay"):
        _tiny(4, decay=1.0).validate()
    with pytest.raises(ConfigError, match="recon_loss"):
        _tiny(4, recon_loss="l2").validate()
    with pytest.raises(ConfigError):
        VQVAE(_tiny(4, num_codes=0))
