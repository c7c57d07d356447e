"""Residual codes (several per grid position, coarse to fine): the quantiser codes what the stages before it
left, the VQ-VAE encodes and decodes (N, depth, h, w) grids, and MaskGIT decodes them depth by depth."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from oasisvq.config import ConfigError, ModelConfig
from oasisvq.models.priors import MaskGITPrior, PriorConfig, build_prior
from oasisvq.models.quantizer import ResidualQuantizer
from oasisvq.models.vqvae import VQVAE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_stage_codes_the_residual_of_the_stages_before():
    torch.manual_seed(0)
    rq = ResidualQuantizer(3, num_codes=8, dim=2)
    for vq in rq.stages:
        vq.codebook.copy_(torch.randn(8, 2))
    z = torch.randn(2, 2, 3, 3)
    idx = rq.assign_grid(z)
    assert idx.shape == (2, 3, 3, 3)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    residual, errors = flat.clone(), []
    for d, vq in enumerate(rq.stages):  # by hand: the nearest code to what is left, stage by stage
        nearest = torch.cdist(residual, vq.codebook).argmin(1)
        assert torch.equal(nearest, idx[:, d].reshape(-1))
        residual = residual - vq.codebook[nearest]
        errors.append(float(residual.pow(2).mean()))
    torch.testing.assert_close(rq.lookup(idx), z - residual.view(2, 3, 3, 2).permute(0, 3, 1, 2))
    assert rq.codebook.shape == (3, 8, 2)


def test_straight_through_and_commitment_of_every_stage():
    torch.manual_seed(0)
    rq = ResidualQuantizer(2, num_codes=4, dim=3).train()
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    q, idx, commit, stats = rq(z)
    torch.testing.assert_close(q, rq.lookup(idx))  # the value is the sum of both stages' codes
    q.sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity gradient to the encoder
    assert commit > 0 and set(stats) == {"perplexity", "usage"}


def test_vqvae_with_residual_codes_encodes_decodes_and_counts_its_bits():
    cfg = ModelConfig(downsample=4, channels=(8, 8), hidden=8, res_blocks=1, num_codes=16, code_dim=4, code_depth=3)
    torch.manual_seed(0)
    model = VQVAE(cfg)
    x = torch.rand(2, 1, 16, 16)
    model.train()
    model(x)  # initialises the codebooks from the batch
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (2, 3, 4, 4) and int(codes.max()) < 16
    recon, _ = model(x)
    torch.testing.assert_close(model.decode_indices(codes), recon.clamp(0, 1))
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        model.decode_indices(codes[:, 0])
    with pytest.raises(ConfigError, match="code_depth"):
        VQVAE(dataclasses.replace(cfg, code_depth=0))


def _prior(depth: int, **kw) -> MaskGITPrior:
    torch.manual_seed(0)
    return MaskGITPrior(6, (depth, 3, 4), width=16, layers=2, heads=2, **kw).eval()


def test_maskgit_decodes_depth_by_depth():
    model = _prior(2)
    seen: list[torch.Tensor] = []
    model.tok_fine[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    coarse: list[torch.Tensor] = []
    model.tok.register_forward_pre_hook(lambda _m, args: coarse.append(args[0].clone()))
    out = model.sample(3, (2, 3, 4), generator=torch.Generator().manual_seed(0), steps=4)
    assert out.shape == (3, 2, 3, 4) and int(out.max()) < 6  # no [MASK] left
    assert len(seen) == 8  # 4 passes per depth
    for x in seen[:4]:  # while the coarse codes are decoded, the fine ones are all masked
        assert bool((x == model.mask_id).all())
    for c, x in zip(coarse[4:], seen[4:]):  # then the coarse ones are fixed and the fine ones filled
        assert torch.equal(c, out[:, 0].reshape(3, -1))
    assert int((seen[4] == model.mask_id).sum()) == 3 * 12 and int((seen[-1] == model.mask_id).sum()) > 0


def test_maskgit_loss_is_that_of_one_depth_given_the_ones_before():
    model = _prior(3).train()
    inputs: dict[int, torch.Tensor] = {}
    for d, tok in enumerate(model._toks()):
        tok.register_forward_pre_hook(lambda _m, args, d=d: inputs.__setitem__(d, args[0].clone()))
    torch.manual_seed(1)
    codes = torch.randint(0, 6, (64, 3, 3, 4))
    loss = model.loss(codes)
    assert torch.isfinite(loss)
    masked = torch.stack([inputs[d] == model.mask_id for d in range(3)], 1)  # (N, depth, h*w)
    stages = []
    for grid in masked:
        partly = [d for d in range(3) if grid[d].any() and not grid[d].all()] or \
                 [min(d for d in range(3) if grid[d].any())]
        stage = partly[0]
        assert not grid[:stage].any() and grid[stage].any() and grid[stage + 1:].all()
        stages.append(stage)
    assert set(stages) == {0, 1, 2}  # every depth is trained


def test_only_maskgit_takes_residual_codes():
    for kind in ("transformer", "pixelcnn"):
        with pytest.raises(ConfigError, match="--kind maskgit"):
            build_prior(PriorConfig(kind=kind, kernel=3), 8, (2, 4, 4))
    assert build_prior(PriorConfig(kind="maskgit"), 8, (2, 4, 4)).depth == 2


def test_train_prior_and_sample_on_a_run_with_residual_codes(tmp_path, monkeypatch):
    from oasisvq import prior, sampling
    from oasisvq.checkpoint import load_checkpoint

    from .test_sampling import TINY, _slices, make_run

    run = make_run(tmp_path / "run", code_depth=2)
    data = _slices()
    monkeypatch.setattr("oasisvq.data.load_slices", lambda *a, **kw: data)
    res = prior.train_prior(run, "maskgit", epochs=2, progress=False, **TINY)
    assert 0 < res["val_bits"] < 6
    codes = load_checkpoint(run / "prior-maskgit" / "codes.safetensors")[0]
    assert codes["train.codes"].shape == (12, 2, 4, 4)
    assert load_checkpoint(run / "prior-maskgit" / "last.safetensors")[1]["grid"] == [2, 4, 4]
    info = sampling.sample(run, "maskgit", n=3, out=tmp_path / "s", level=(0.2, 0.4), steps=4, progress=False)
    assert len(info["levels"]) == 3 and len(list((tmp_path / "s").glob("sample_*.png"))) == 3
    with pytest.raises(ConfigError, match="--kind maskgit"):
        prior.train_prior(run, "transformer", epochs=1, progress=False, **TINY)
