"""MaskGIT prior: the cosine masking schedule, the masked-only loss, parallel decoding, and that a tiny one
learns a trivially structured grid distribution."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from oasisvq.errors import ConfigError
from oasisvq.models.priors import MaskGITPrior, mask_ratio, masked_count

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(num_codes: int = 6, grid: tuple[int, int] = (4, 4), **kw) -> MaskGITPrior:
    torch.manual_seed(0)
    return MaskGITPrior(num_codes, grid, width=16, layers=2, heads=2, **kw).eval()


def test_mask_schedule_is_cosine_from_one_to_zero():
    assert mask_ratio(0.0) == 1.0 and mask_ratio(1.0) == 0.0
    t = torch.linspace(0, 1, 101)
    r = mask_ratio(t)
    assert r[0] == 1 and r[-1] == 0 and torch.all(r[1:] < r[:-1])
    torch.testing.assert_close(r, torch.cos(math.pi / 2 * t))
    assert mask_ratio(0.5) == pytest.approx(math.sqrt(0.5))
    assert [masked_count(s, 4, 16) for s in range(5)] == [16, 14, 11, 6, 0]
    for length in (1, 2, 7, 16, 256, 1024):
        for steps in range(1, min(length, 24) + 1):
            counts = [masked_count(s, steps, length) for s in range(steps + 1)]
            assert counts[0] == length and counts[-1] == 0
            assert all(b < a for a, b in itertools.pairwise(counts)), "a pass that decodes nothing"
    with pytest.raises(ValueError):
        masked_count(5, 4, 16)


def test_attention_is_bidirectional():
    model = _model()
    idx = torch.randint(0, 6, (1, 4, 4))
    changed = idx.clone()
    changed[0, 3, 3] = (changed[0, 3, 3] + 1) % 6
    diff = (model(changed) - model(idx)).abs().amax(1)[0]
    assert diff[0, 0] > 0  # the first position sees the last


def test_a_grouped_token_holds_exactly_its_block_of_codes():
    """Without attention blocks a token's logits read only its own codes: changing one code must change the
    logits of exactly the 2x2 block around it, wherever it lies."""
    torch.manual_seed(0)
    model = MaskGITPrior(6, (4, 6), width=16, layers=0, heads=2, group=2).eval()
    idx = torch.randint(0, 6, (1, 4, 6))
    for r, c in itertools.product(range(4), range(6)):
        changed = idx.clone()
        changed[0, r, c] = (changed[0, r, c] + 1) % 6
        moved = (model(changed) - model(idx)).abs().amax(1)[0] > 0
        block = torch.zeros(4, 6, dtype=torch.bool)
        block[r // 2 * 2:r // 2 * 2 + 2, c // 2 * 2:c // 2 * 2 + 2] = True
        assert torch.equal(moved, block), (r, c)
    with pytest.raises(ValueError, match="groups"):
        model(torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="groups"):
        MaskGITPrior(6, (4, 5), group=2)


@pytest.mark.parametrize(("steps", "grid", "guidance"), [(1, (4, 4), 1.0), (5, (4, 4), 1.0), (12, (3, 5), 1.0),
                                                         (7, (4, 4), 2.0), (40, (2, 3), 1.0)])
def test_decoding_fills_every_position_in_exactly_the_given_steps(steps, grid, guidance):
    model = _model(grid=(4, 5), num_classes=2 if guidance != 1 else 0)
    inputs: list[torch.Tensor] = []
    model.tok.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
    cond = torch.tensor([0, 1, 1]) if model.num_classes else None
    out = model.sample(3, grid, generator=torch.Generator().manual_seed(0), cond=cond, guidance=guidance,
                       steps=steps)
    length, passes = grid[0] * grid[1], min(steps, grid[0] * grid[1])  # at most one pass per position
    assert len(inputs) == passes
    for s, x in enumerate(inputs):
        assert x.shape == ((6 if guidance != 1 else 3), length)  # a guided pass doubles the batch
        assert torch.all((x == model.mask_id).sum(1) == masked_count(s, passes, length))
        if s:  # codes, once fixed, stay
            fixed = inputs[s - 1] != model.mask_id
            assert torch.equal(x[fixed], inputs[s - 1][fixed])
    assert out.shape == (3, *grid) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < model.num_codes  # no [MASK] left
    fixed = inputs[-1][:3] != model.mask_id  # and the output keeps them
    assert torch.equal(out.flatten(1)[fixed], inputs[-1][:3][fixed])


def test_choice_temperature_zero_keeps_the_surest_codes_and_a_large_one_keeps_any():
    model = _model()
    seen: list[torch.Tensor] = []
    logits = torch.zeros(1, 16, 6)
    logits[0, [1, 4, 6, 11, 13], 2] = 20.0  # five sure positions; the others are uniform over 6 codes

    def fixed_logits(seq, h, w, cond):
        seen.append(seq.clone())
        return logits.expand(len(seq), -1, -1)

    model._run = fixed_logits
    sure = torch.zeros(16, dtype=torch.bool)
    sure[[1, 4, 6, 11, 13]] = True
    assert masked_count(1, 2, 16) == 16 - 5  # the first of two passes keeps five codes
    kept = []
    for seed in range(4):
        for choice in (0.0, 1e6):
            seen.clear()
            model.sample(3, (4, 4), generator=torch.Generator().manual_seed(seed), steps=2, choice_temperature=choice)
            kept.append((choice, seen[1] != model.mask_id))
    assert all(torch.equal(k, sure.expand(3, -1)) for c, k in kept if c == 0)
    assert sum(not torch.equal(k, sure.expand(3, -1)) for c, k in kept if c > 0) == 4  # random: never these


def test_decoding_defaults_to_decode_steps_and_is_reproducible():
    model = _model(decode_steps=3)
    passes = []
    model.head.register_forward_hook(lambda *_: passes.append(1))
    a = model.sample(4, (4, 4), generator=torch.Generator().manual_seed(7))
    assert len(passes) == 3
    b = model.sample(4, (4, 4), generator=torch.Generator().manual_seed(7))
    c = model.sample(4, (4, 4), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.sample(2, (2, 3), generator=torch.Generator().manual_seed(0)).shape == (2, 2, 3)
    with pytest.raises(ValueError):
        model.sample(1, (5, 4))  # larger than the trained grid


def test_given_codes_stay_and_only_the_masked_ones_are_drawn_in_the_given_passes():
    model = _model(decode_steps=8)
    passes = []
    model.head.register_forward_hook(lambda *_: passes.append(1))
    given = torch.randint(0, 6, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    draw = torch.zeros(3, 16, dtype=torch.bool)
    draw[0, [0, 5, 9]] = draw[1, [2, 3, 15]] = draw[2, [7, 8, 12]] = True
    draw = draw.view(3, 4, 4)
    out = model.sample(3, (4, 4), generator=torch.Generator().manual_seed(1), given=given.masked_fill(draw, model.mask_id))
    assert len(passes) == 3  # at most one pass per code to draw
    assert torch.equal(out[~draw], given[~draw]) and bool((out[draw] < model.mask_id).all())
    assert torch.equal(model.sample(3, (4, 4), given=given), given)  # nothing to draw
    ragged = given.clone()
    ragged[0, 0, 0] = model.mask_id
    with pytest.raises(ValueError, match="as many positions"):
        model.sample(3, (4, 4), given=ragged)


def _record_passes(model: MaskGITPrior) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each forward pass's input codes (N, L) and its logits, which keep their gradient."""
    inputs, logits = [], []
    model.tok.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))

    def keep(_m, _args, out):
        out.retain_grad()
        logits.append(out)

    model.head.register_forward_hook(keep)
    return inputs, logits


def test_loss_counts_only_the_masked_positions():
    model = _model(num_classes=3).train()
    inputs, logits = _record_passes(model)
    idx, cond = torch.randint(0, 6, (64, 4, 4)), torch.randint(0, 3, (64,))
    loss = model.loss(idx, cond)
    loss.backward()
    masked = inputs[0] == model.mask_id  # (N, L)
    assert torch.all(masked.sum(1) >= 1)
    grad = logits[0].grad.abs().sum(-1)  # (N, L)
    assert torch.all(grad[~masked] == 0) and torch.all(grad[masked] > 0)
    target = idx.flatten(1)
    expect = F.cross_entropy(logits[0][masked].float(), target[masked])
    torch.testing.assert_close(loss, expect)
    assert torch.equal(inputs[0][~masked], target[~masked])  # unmasked inputs are the true codes


def test_loss_masks_a_cosine_share_and_draws_from_the_global_rng():
    model = _model(grid=(8, 8)).train()
    inputs = []
    model.tok.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
    idx = torch.randint(0, 6, (2000, 8, 8))
    torch.manual_seed(1)
    a = model.loss(idx)
    share = (inputs[0] == model.mask_id).float().mean(1)
    # E[cos(pi/2 u)] = 2/pi, plus about half a position from rounding up
    assert abs(share.mean().item() - (2 / math.pi + 0.5 / 64)) < 0.02
    assert share.min() >= 1 / 64 and share.max() == 1
    torch.manual_seed(1)
    torch.testing.assert_close(model.loss(idx), a)


def test_the_unrolled_loss_reads_the_priors_own_draws_and_predicts_every_real_code():
    model = _model(num_classes=3).train()
    inputs, logits = _record_passes(model)
    idx, cond = torch.randint(0, 6, (64, 4, 4)), torch.randint(0, 3, (64,))
    torch.manual_seed(3)
    out = model.losses(idx, cond, unrolled=True)
    out["unrolled"].backward()
    first, second, target = inputs[0], inputs[1], idx.flatten(1)
    masked = first == model.mask_id
    # the second pass reads the real codes where the first had them, and a drawn code (never [MASK]) elsewhere
    assert torch.equal(second[~masked], target[~masked]) and bool((second[masked] < model.mask_id).all())
    assert not torch.equal(second[masked], target[masked])  # an untrained prior draws other codes
    assert logits[0].grad is None  # the draw carries no gradient back into the first pass
    assert bool((logits[1].grad.abs().sum(-1) > 0).all())  # every position of the second pass is predicted
    torch.testing.assert_close(out["unrolled"], F.cross_entropy(logits[1].flatten(0, 1).float(), target.flatten()))
    torch.testing.assert_close(out["loss"], out["masked"] + out["unrolled"])
    torch.manual_seed(3)  # the masked part is the plain loss at the same masks
    torch.testing.assert_close(model.loss(idx, cond), out["masked"])


@pytest.mark.parametrize("group", [1, 2])
def test_tiny_maskgit_learns_two_patterns(group):
    """Every training grid is one of two fixed 4x4 patterns of 8 codes (chance of drawing either: 2 / 8**16);
    with group 2, four tokens of 2x2 codes each."""
    torch.manual_seed(0)
    patterns = torch.randint(0, 8, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    model = MaskGITPrior(8, (4, 4), width=32, layers=2, heads=2, group=group).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(200):
        loss = model.loss(patterns[torch.randint(0, 2, (32,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    s = model.sample(64, (4, 4), generator=torch.Generator().manual_seed(0)).flatten(1)
    hits = torch.stack([(s == p.flatten()).all(1) for p in patterns])
    assert hits.any(0).float().mean() > 0.5  # (8 seeds: 0.61 - 0.89)
    assert hits.any(1).all()  # both modes, not a collapse onto one
    agree = torch.stack([(s == p.flatten()).float().mean(1) for p in patterns]).amax(0)
    assert agree.mean() > 0.9  # the misses are near misses (8 seeds: 0.965 - 0.992)
