"""Priors: causality of the PixelCNN masks, KV-cache agreement, reproducible sampling, the registry, the
training loss, condition dropout and classifier-free guidance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from oasisvq.errors import ConfigError
from oasisvq.models.priors import (
    PRIOR_KINDS,
    GatedPixelCNN,
    LevelEmbedding,
    MaskGITPrior,
    PriorConfig,
    TransformerPrior,
    build_prior,
    guided_logits,
    level_coordinates,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _dependency(model: GatedPixelCNN, h: int, w: int) -> torch.Tensor:
    """dep[i, j] = True when the features at raster position i that the output head reads have a non-zero
    gradient w.r.t. input j. The head is position-wise (1x1 convolutions), so the logits at i see what
    its input at i sees; measured before it because at some random initialisations its ReLUs are off at
    a position for every input, and the logits there would hide the masks' dependencies."""
    torch.manual_seed(0)
    width = model.embed.embedding_dim
    seen = {}
    hook = model.head.register_forward_hook(lambda _m, args, _out: seen.update(h=args[0]))
    dep = torch.zeros(h * w, h * w, dtype=torch.bool)
    for i in range(h * w):
        x = torch.randn(1, width, h, w, dtype=torch.float64, requires_grad=True)
        model.forward_embedded(x)
        (seen["h"][0, :, i // w, i % w] * torch.randn(width, dtype=torch.float64)).sum().backward()
        dep[i] = (x.grad[0].abs().sum(0) > 0).flatten()
    hook.remove()
    return dep


@pytest.mark.parametrize("kernel", [3, 5])
def test_pixelcnn_masks_hide_the_future_and_have_no_blind_spot(kernel):
    h, w = 4, 5
    model = GatedPixelCNN(num_codes=7, width=8, layers=5, kernel=kernel).double()
    dep = _dependency(model, h, w)
    future = torch.triu(torch.ones(h * w, h * w, dtype=torch.bool))  # j >= i
    assert not dep[future].any(), "an output depends on its own or a later position"
    # No blind spot: with enough layers every earlier position is seen, including the ones to the upper
    # right that a naive masked 3x3 PixelCNN misses.
    assert dep[~future].all(), "some earlier position is invisible (blind spot)"
    # explicit blind-spot position: (1, 0) must see (0, 4), the far upper right
    assert dep[1 * w + 0, 0 * w + 4]


def test_pixelcnn_conditional_forward_shapes_and_cond_matters():
    torch.manual_seed(0)
    model = GatedPixelCNN(num_codes=6, width=8, layers=2, kernel=3, num_classes=3).eval()
    idx = torch.randint(0, 6, (2, 3, 4))
    a = model(idx, torch.tensor([0, 0]))
    b = model(idx, torch.tensor([2, 2]))
    assert a.shape == (2, 6, 3, 4)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        model(idx)  # a conditional prior needs cond


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = TransformerPrior(num_codes=9, grid=(3, 4), width=16, layers=2, heads=2, dropout=0.0).eval()
    idx = torch.randint(0, 9, (1, 3, 4))
    base = model(idx).flatten(2)
    for j in range(12):
        changed = idx.clone().flatten()
        changed[j] = (changed[j] + 1) % 9
        out = model(changed.view(1, 3, 4)).flatten(2)
        diff = (out - base).abs().amax(1)[0]
        assert torch.all(diff[: j + 1] == 0), f"position <= {j} saw input {j}"
        assert diff[j + 1:].gt(0).all() or j == 11


@pytest.mark.parametrize("num_classes", [0, 3])
def test_transformer_cached_logits_equal_full_forward(num_classes):
    torch.manual_seed(0)
    model = TransformerPrior(num_codes=11, grid=(4, 4), width=32, layers=2, heads=4,
                             num_classes=num_classes, dropout=0.1).eval()
    idx = torch.randint(0, 11, (3, 4, 4))
    cond = torch.tensor([0, 1, 2]) if num_classes else None
    full = model(idx, cond)
    cached = model.cached_logits(idx, cond)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_transformer_cached_and_uncached_sampling_agree():
    torch.manual_seed(0)
    model = TransformerPrior(num_codes=13, grid=(4, 5), width=32, layers=2, heads=4, dropout=0.0).eval()
    a = model.sample(4, (4, 5), generator=torch.Generator().manual_seed(3), use_cache=True)
    b = model.sample(4, (4, 5), generator=torch.Generator().manual_seed(3), use_cache=False)
    assert a.shape == (4, 4, 5) and a.dtype == torch.long
    assert torch.equal(a, b)
    # smaller grids than the trained one work too (positions use the sampled grid's width)
    assert model.sample(2, (2, 5), generator=torch.Generator().manual_seed(0)).shape == (2, 2, 5)


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn"])
def test_sampling_is_reproducible_and_respects_top_k(kind):
    cfg = PriorConfig(kind=kind, layers=2, width=16, heads=2, kernel=3, num_classes=2)
    torch.manual_seed(0)
    model = build_prior(cfg, num_codes=10, grid=(7, 3)).eval()  # 7 rows: PixelCNN sampling crops rows
    cond = torch.tensor([0, 1, 1])
    s1 = model.sample(3, (7, 3), generator=torch.Generator().manual_seed(7), cond=cond)
    s2 = model.sample(3, (7, 3), generator=torch.Generator().manual_seed(7), cond=cond)
    s3 = model.sample(3, (7, 3), generator=torch.Generator().manual_seed(8), cond=cond)
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)
    assert int(s1.min()) >= 0 and int(s1.max()) < 10
    # top_k=1 is greedy: the sampled code is the arg-max of the logits given the previous codes
    g = model.sample(3, (7, 3), top_k=1, generator=torch.Generator().manual_seed(1), cond=cond)
    assert torch.equal(model(g, cond).argmax(1), g)


def test_sampling_follows_the_predicted_distribution():
    """With a prior whose logits are fixed, the sampled code frequencies match softmax(logits / T)."""
    model = TransformerPrior(num_codes=4, grid=(1, 1), width=8, layers=1, heads=1, dropout=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.bias.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]))
        model.head.weight[:, 0] = torch.tensor([0.0, 1.0, 2.0, -1.0])
    s = model.sample(20000, (1, 1), temperature=2.0, generator=torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(s, minlength=4).float() / s.numel()
    expect = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -1.0]) / 2.0, 0)
    torch.testing.assert_close(freq, expect, atol=0.015, rtol=0)


def test_codebook_init_and_config_validation():
    cb = torch.randn(10, 6)
    for kind in ("transformer", "pixelcnn"):
        model = build_prior(PriorConfig(kind=kind, layers=1, width=8, heads=2), 10, (2, 2))
        model.init_from_codebook(cb)
        emb = model.tok.weight if kind == "transformer" else model.embed.weight
        # nearest neighbours in the codebook stay close in the embedding
        assert torch.corrcoef(torch.stack([torch.pdist(cb), torch.pdist(emb.detach())]))[0, 1] > 0.5
    with pytest.raises(ConfigError):
        PriorConfig(kind="gan").validate()
    with pytest.raises(ConfigError):
        PriorConfig(width=10, heads=4).validate()
    upsampler = {"coarse_run": "c", "patch": 4, "autoregressive": True}
    for kind, extra in (("transformer", {}), ("pixelcnn", {}), ("upsampler", upsampler)):
        with pytest.raises(ConfigError, match="unrolled"):  # it draws codes in parallel passes
            PriorConfig(kind=kind, unrolled=True, **extra).validate()
    PriorConfig(kind="maskgit", unrolled=True).validate()


def _tiny(kind: str, num_classes: int = 0, **kw) -> torch.nn.Module:
    cfg = PriorConfig(kind=kind, layers=2, width=16, heads=2, kernel=3, num_classes=num_classes, **kw)
    return build_prior(cfg, num_codes=10, grid=(3, 4))


def _class_inputs(model: torch.nn.Module) -> tuple[list[torch.Tensor], RemovableHandle]:
    """Records the class indices each forward pass feeds the (first) class embedding."""
    emb = model.blocks[0].cond if isinstance(model, GatedPixelCNN) else model.cls
    seen: list[torch.Tensor] = []
    return seen, emb.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))


def test_registry_builds_every_kind():
    assert list(PRIOR_KINDS) == ["transformer", "pixelcnn", "maskgit", "upsampler"]  # upsampler: test_upsampler.py
    expected = {"transformer": TransformerPrior, "pixelcnn": GatedPixelCNN, "maskgit": MaskGITPrior}
    for kind, cls in expected.items():
        model = _tiny(kind, num_classes=2).eval()
        assert type(model) is PRIOR_KINDS[kind] is cls
        model.init_from_codebook(torch.randn(10, 6))
        out = model(torch.randint(0, 10, (2, 3, 4)), torch.tensor([0, 1]))
        assert out.shape == (2, 10, 3, 4)
    with pytest.raises(ConfigError):
        PriorConfig(cond_dropout=1.0).validate()
    with pytest.raises(ConfigError):
        PriorConfig(cond_dropout=-0.1).validate()
    with pytest.raises(ConfigError):
        PriorConfig(kind="maskgit", decode_steps=0).validate()
    with pytest.raises(ConfigError):
        PriorConfig(kind="maskgit", width=10, heads=4).validate()
    PriorConfig(kind="pixelcnn", width=10, heads=4).validate()  # heads do not matter to a PixelCNN


def test_a_new_kind_is_a_class_and_a_registry_line(monkeypatch):
    class Wide(TransformerPrior):
        @classmethod
        def from_config(cls, cfg, num_codes, grid):
            return cls(num_codes, grid, 2 * cfg.width, cfg.layers, cfg.heads)

    monkeypatch.setitem(PRIOR_KINDS, "wide", Wide)
    model = build_prior(PriorConfig(kind="wide", width=8, heads=2, layers=1), 5, (2, 2))
    assert type(model) is Wide and model.tok.embedding_dim == 16
    with pytest.raises(ConfigError):
        PriorConfig(kind="wide", width=10, heads=4).validate()  # it inherits the transformer's checks


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn"])
def test_autoregressive_loss_is_the_mean_cross_entropy_of_every_code(kind):
    torch.manual_seed(0)
    model = _tiny(kind, num_classes=3, cond_dropout=0.5)
    idx, cond = torch.randint(0, 10, (8, 3, 4)), torch.randint(0, 3, (8,))
    model.eval()
    torch.testing.assert_close(model.loss(idx, cond), F.cross_entropy(model(idx, cond).float(), idx))
    model.train()  # condition dropout draws from the global RNG: the same seed, the same loss
    torch.manual_seed(1)
    a = model.loss(idx, cond)
    torch.manual_seed(1)
    torch.testing.assert_close(a, F.cross_entropy(model(idx, cond).float(), idx))
    a.backward()


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn", "maskgit"])
def test_cond_dropout_happens_only_in_training(kind):
    torch.manual_seed(0)
    model = _tiny(kind, num_classes=3, cond_dropout=0.5)
    seen, _ = _class_inputs(model)
    idx, cond = torch.randint(0, 10, (400, 3, 4)), torch.randint(0, 3, (400,))
    model.train()
    model(idx, cond)
    dropped = seen[-1] == 3
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(seen[-1][~dropped], cond[~dropped])  # the others keep their class
    model.eval()
    state = torch.get_rng_state()
    model(idx, cond)
    assert torch.equal(seen[-1], cond)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws nothing
    model.train()
    model.cond_dropout = 0.0
    model(idx, cond)
    assert torch.equal(seen[-1], cond)


def test_levels_between_class_centres_are_embedded_between_their_classes():
    coords = level_coordinates(torch.tensor([0.0, 1 / 16, 3 / 16, 0.25, 0.9, 1.0]), 8)
    assert coords.tolist() == pytest.approx([0, 0, 1, 1.5, 6.7, 7])  # centres map to whole classes; ends clamp
    torch.manual_seed(0)
    emb = LevelEmbedding(9, 5)  # 8 classes and the null class
    whole = torch.tensor([0, 3, 7, 8])
    assert torch.equal(emb(whole), emb.weight[whole])  # whole classes: a plain lookup
    assert torch.allclose(emb(whole.float()), emb.weight[whole])  # the same class given as a float
    blend = emb(torch.tensor([1.5, 6.7]))
    assert torch.allclose(blend[0], (emb.weight[1] + emb.weight[2]) / 2)
    assert torch.allclose(blend[1], 0.3 * emb.weight[6] + 0.7 * emb.weight[7], atol=1e-6)
    one = LevelEmbedding(2, 3)  # a single class: every level is that class
    assert torch.allclose(one(torch.tensor([0.0, 0.4])), one.weight[[0, 0]])


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn", "maskgit"])
def test_every_prior_takes_fractional_levels(kind):
    torch.manual_seed(0)
    model = _tiny(kind, num_classes=3).eval()
    idx = torch.randint(0, 10, (3, 3, 4))
    assert torch.allclose(model(idx, torch.tensor([0, 2, 3])), model(idx, torch.tensor([0.0, 2.0, 3.0])), atol=1e-6)
    between = model(idx, torch.tensor([0.5, 0.5, 0.5]))
    assert not torch.allclose(between, model(idx, torch.tensor([0, 0, 0])))
    assert not torch.allclose(between, model(idx, torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match="must lie in"):
        model(idx, torch.tensor([-0.5, 0.0, 0.0]))


def test_guided_logits_mixes_conditional_and_unconditional():
    c, u = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(guided_logits(c, u, 0.0), u)
    assert torch.equal(guided_logits(c, u, 1.0), c)
    torch.testing.assert_close(guided_logits(c, u, 3.0), u + 3 * (c - u))


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn", "maskgit"])
def test_guidance_runs_only_the_passes_it_needs(kind):
    torch.manual_seed(0)
    model = _tiny(kind, num_classes=3).eval()
    cond, null = torch.tensor([0, 2]), torch.tensor([3, 3])

    def run(c: torch.Tensor, w: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seen, hook = _class_inputs(model)
        out = model.sample(2, (3, 4), generator=torch.Generator().manual_seed(5), cond=c, guidance=w)
        hook.remove()
        return out, seen

    s0, seen0 = run(cond, 0.0)
    assert all(torch.equal(x, null) for x in seen0)  # guidance 0: the null class only
    assert torch.equal(s0, run(null, 1.0)[0])  # ... which is sampling with the null class
    _, seen1 = run(cond, 1.0)
    assert all(torch.equal(x, cond) for x in seen1)  # guidance 1: a single conditional pass
    _, seen2 = run(cond, 2.5)
    assert all(torch.equal(x, torch.cat([cond, null])) for x in seen2)  # both, as one doubled batch
    with pytest.raises(ValueError):
        _tiny(kind).sample(1, (3, 4), guidance=2.0)  # guidance needs a conditional prior


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn"])
def test_greedy_guided_sampling_takes_the_argmax_of_the_guided_logits(kind):
    torch.manual_seed(0)
    model = _tiny(kind, num_classes=3).eval()
    cond, null = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 3])
    g = model.sample(3, (3, 4), top_k=1, generator=torch.Generator().manual_seed(1), cond=cond, guidance=2.5)
    assert torch.equal(guided_logits(model(g, cond), model(g, null), 2.5).argmax(1), g)


def test_transformer_guided_sampling_keeps_the_cache_correct():
    torch.manual_seed(0)
    model = TransformerPrior(num_codes=13, grid=(4, 5), width=32, layers=2, heads=4, num_classes=3).eval()
    cond = torch.tensor([0, 1, 2])
    a = model.sample(3, (4, 5), generator=torch.Generator().manual_seed(3), cond=cond, guidance=2.0)
    b = model.sample(3, (4, 5), generator=torch.Generator().manual_seed(3), cond=cond, guidance=2.0,
                     use_cache=False)
    assert torch.equal(a, b)


def test_dropout_acts_on_residual_branches_not_on_attention_weights():
    """Attention-weight dropout sends CPU attention down a 5x slower path; dropout lives on the branches."""
    from oasisvq.models.priors import Block

    torch.manual_seed(0)
    block = Block(width=16, heads=2, dropout=0.5, causal=False).train()
    x = torch.randn(2, 6, 16)
    assert torch.equal(block.attn(x), block.attn(x))  # attention itself is deterministic in training
    assert not torch.equal(block(x), block(x))  # the block drops its branches
    block.eval()
    assert torch.equal(block(x), block(x))
