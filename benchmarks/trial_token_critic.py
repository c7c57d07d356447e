"""Trial: Token-Critic (Lezama et al. 2022) for the upsampler. A second network, trained to tell the codes
the upsampler drew from the real ones in grids it partly filled, chooses at each decoding pass which codes
stay and which are drawn again (any code, also one kept earlier), instead of the upsampler's own
confidence. The failure it targets: codes drawn together in one pass disagree, and the upsampler's own
conditionals, re-run (Gibbs), settle into stripes over the whole head (docs/generation_log.md).

    python benchmarks/trial_token_critic.py RUN --minutes M --out DIR [--levels ...] [--samples N --seeds S ...]

RUN holds a 64x64 VQ-VAE and its upsampler. The critic starts as a copy of the upsampler with a
one-output head. Writes DIR/critic.safetensors, DIR/real_layout.png (held-out slices' own layouts, fine
codes drawn by the upsampler alone and with the critic) and, with --samples, DIR/{plain,critic}-seedS
sample folders for `oasisvq evaluate-samples`.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from oasisvq import data, figures, sampling
from oasisvq.download import OASIS_CREDIT
from oasisvq.evaluation.generation import dark_lines
from oasisvq.models.priors import _inverse_cdf, mask_ratio, masked_count
from oasisvq.prior import decode_uint8, load_prior
from oasisvq.tokenizer import load_model


def make_critic(upsampler) -> nn.Module:
    critic = copy.deepcopy(upsampler)
    width = upsampler.tok.embedding_dim
    critic.head = nn.Sequential(nn.ReLU(), nn.Conv2d(width, 1, 1))
    return critic


@torch.no_grad()
def encode_split(fine, coarse, slices, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine code grids (N, h, w) and coarse images (N, 1, H, W) uint8 of a SliceSet."""
    codes, layouts = [], []
    for b in tqdm(range(0, len(slices), batch), desc="encode", leave=False):
        x = slices.tensor(np.arange(b, min(b + batch, len(slices))))
        codes.append(fine.encode(x))
        layouts.append(decode_uint8(coarse, coarse.encode(x)))
    return torch.cat(codes), torch.cat(layouts)


def critic_batch(upsampler, codes: torch.Tensor, layout: torch.Tensor, gen: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids with a cosine-scheduled random share of codes drawn by the upsampler (given the rest), and
    which codes were drawn (the critic's targets)."""
    n, h, w = codes.shape
    count = (mask_ratio(torch.rand(n, generator=gen)) * h * w).ceil().clamp(1, h * w)
    rank = torch.rand(n, h * w, generator=gen).argsort(1).argsort(1)
    drawn = rank < count[:, None]
    seq = codes.reshape(n, h * w).masked_fill(drawn, upsampler.mask_id)
    with torch.no_grad():
        logits = upsampler._run(seq, h, w, layout)
        seq[drawn] = _inverse_cdf(logits[drawn].float(), gen)
    return seq, drawn


def train_critic(critic, upsampler, codes, layouts, val_codes, val_layouts, minutes: float, batch: int, lr: float
                 ) -> list[tuple[int, float, float]]:
    opt = torch.optim.AdamW(critic.parameters(), lr=lr, weight_decay=0.0)
    h, w = codes.shape[1:]
    val_gen = torch.Generator().manual_seed(123)
    val_seq, val_drawn = critic_batch(upsampler, val_codes, val_layouts, val_gen)
    curve, step, t0 = [], 0, time.perf_counter()
    rng = np.random.default_rng(0)
    bar = tqdm(total=round(minutes * 60), desc="critic", unit="s")
    while time.perf_counter() - t0 < minutes * 60:
        idx = torch.from_numpy(rng.choice(len(codes), batch, replace=False))
        seq, drawn = critic_batch(upsampler, codes[idx], layouts[idx])
        critic.train()
        logit = critic._run(seq, h, w, layouts[idx]).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logit, drawn.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            critic.eval()
            with torch.no_grad():
                v = F.binary_cross_entropy_with_logits(critic._run(val_seq, h, w, val_layouts).squeeze(-1),
                                                       val_drawn.float()).item()
            curve.append((step, loss.item(), v))
            bar.set_postfix(step=step, train=f"{loss.item():.3f}", val=f"{v:.3f}")
        bar.update(max(0, min(round(time.perf_counter() - t0), bar.total) - bar.n))
    bar.close()
    return curve


@torch.no_grad()
def critic_sample(upsampler, critic, n: int, grid_hw: tuple[int, int], temperature: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None, cond: torch.Tensor | None = None, steps: int | None = None,
                  choice_temperature: float = 1.0, **_: object) -> torch.Tensor:
    """Each pass draws every masked code from the upsampler, then masks again the codes the critic finds
    most likely drawn (any code, kept earlier or not; Gumbel noise scaled by ``choice_temperature``,
    annealed to 0), as many as the cosine schedule leaves masked."""
    h, w = grid_hw
    length = h * w
    steps = min(steps or upsampler.decode_steps, length)
    seq = torch.full((n, length), upsampler.mask_id, dtype=torch.long)
    for s in range(steps):
        masked = seq == upsampler.mask_id
        logits = upsampler._run(seq, h, w, cond)[masked].float() / temperature
        seq[masked] = _inverse_cdf(logits, generator)
        keep_masked = masked_count(s + 1, steps, length)
        if keep_masked == 0:
            break
        fake = critic._run(seq, h, w, cond).squeeze(-1).float()
        gumbel = -torch.log(-torch.log(torch.rand(n, length, generator=generator)))
        fake = fake + choice_temperature * (1 - (s + 1) / steps) * gumbel
        seq.scatter_(1, fake.topk(keep_masked, dim=1).indices, upsampler.mask_id)
    return seq.view(n, h, w)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--levels", nargs="+", type=float, default=[0.3, 0.45, 0.6, 0.75])
    ap.add_argument("--steps", type=int, default=32, help="decoding passes for both")
    ap.add_argument("--choice-temperature", type=float, default=1.0, help="critic ranking noise")
    ap.add_argument("--samples", type=int, default=0, help="full samples per seed (layout prior + upsampler)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    upsampler, meta = load_prior(a.run, "upsampler", "best", torch.device("cpu"))
    upsampler.eval()
    fine, cfg = load_model(a.run, "best")
    coarse, _ = load_model(meta["prior_config"]["coarse_run"], "best")
    slices = data.load_slices(cfg.data, None, progress=False)
    critic = make_critic(upsampler)
    path = a.out / "critic.safetensors"
    if path.is_file():
        critic.load_state_dict(load_file(path))
        print(f"critic read from {path}")
    else:
        codes, layouts = encode_split(fine, coarse, slices.split("train"))
        val = slices.split("validate")
        vpick = np.arange(0, len(val), max(1, len(val) // 64))[:64]
        vcodes, vlayouts = encode_split(fine, coarse, val.subset(vpick))
        curve = train_critic(critic, upsampler, codes, layouts, vcodes[:64], vlayouts[:64], a.minutes,
                             a.batch_size, a.lr)
        for step, tr, v in curve[:: max(1, len(curve) // 12)] + curve[-1:]:
            print(f"step {step}: train BCE {tr:.3f}, validation BCE {v:.3f}")
        save_file(critic.state_dict(), str(path))
    critic.eval()

    held = slices.split("validate")
    pick = held.nearest_levels(a.levels)
    x = torch.from_numpy(held.uint8(pick)).float().div(255)[:, None]
    grid = tuple(meta["grid"])
    with torch.no_grad():
        layout = decode_uint8(coarse, coarse.encode(x))
        rows = [held.uint8(pick), layout[:, 0].numpy(), decode_uint8(fine, fine.encode(x))[:, 0].numpy()]
        names = ["real", "coarse recon (read)", "fine recon (target)"]
        plain = upsampler.sample(len(pick), grid, generator=torch.Generator().manual_seed(1), cond=layout,
                                 steps=a.steps)
        with_critic = critic_sample(upsampler, critic, len(pick), grid, generator=torch.Generator().manual_seed(1),
                                    cond=layout, steps=a.steps, choice_temperature=a.choice_temperature)
        for name, c in (("upsampler alone", plain), ("with the critic", with_critic)):
            img = decode_uint8(fine, c)[:, 0].numpy()
            rows.append(img)
            names.append(name)
            print(f"{name}: dark-line share {np.mean([dark_lines(i.astype(np.float32) / 255) for i in img]):.3f} "
                  f"(real {np.mean([dark_lines(i.astype(np.float32) / 255) for i in rows[0]]):.3f})")
    for split in ("test", "validate"):  # as benchmarks/dark_lines.py --upsampled: 64 slices of the split
        part = slices.split(split)
        chosen = np.sort(np.random.default_rng(0).permutation(len(part))[:64])
        shares = {"real": [], "upsampler alone": [], "with the critic": []}
        gen_plain, gen_critic = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        with torch.no_grad():
            for b in range(0, len(chosen), 16):
                x = torch.from_numpy(part.uint8(chosen[b:b + 16])).float().div(255)[:, None]
                lay = decode_uint8(coarse, coarse.encode(x))
                drawn = {"real": None,
                         "upsampler alone": upsampler.sample(len(x), grid, generator=gen_plain, cond=lay, steps=a.steps),
                         "with the critic": critic_sample(upsampler, critic, len(x), grid, generator=gen_critic, cond=lay,
                                                          steps=a.steps, choice_temperature=a.choice_temperature)}
                for name, c in drawn.items():
                    img = x[:, 0].numpy() if c is None else decode_uint8(fine, c)[:, 0].numpy().astype(np.float32) / 255
                    shares[name] += [dark_lines(i) for i in img]
        print(f"{split} subject, real layouts of 64 slices: " +
              ", ".join(f"{k} {np.mean(v):.3f}" for k, v in shares.items()), flush=True)
    titles = [f"real, level {held.position[i]:.2f}" for i in pick] + [nm for nm in names[1:] for _ in pick]
    figures.slice_grid(np.concatenate(rows), a.out / "real_layout.png", titles=titles, cols=len(pick),
                       title="upsampler given the real layout, alone and with a token critic (validate subject)",
                       footer=f"Real slices: {OASIS_CREDIT}")

    if a.samples:
        real_load = sampling.load_prior

        def load_with_critic(*args, **kw):
            model, m = real_load(*args, **kw)
            if m["prior_config"]["kind"] == "upsampler":
                model.sample = lambda *s_args, **s_kw: critic_sample(
                    model, critic, *s_args, **{**s_kw, "choice_temperature": a.choice_temperature,
                                               "steps": s_kw.get("steps") or a.steps})
            return model, m

        for seed in a.seeds:
            sampling.sample(a.run, "upsampler", n=a.samples, level=(0.0, 1.0), seed=seed, steps=a.steps,
                            out=a.out / f"plain-seed{seed}", progress=False)
            sampling.load_prior = load_with_critic
            try:
                sampling.sample(a.run, "upsampler", n=a.samples, level=(0.0, 1.0), seed=seed, steps=a.steps,
                                out=a.out / f"critic-seed{seed}", progress=False)
            finally:
                sampling.load_prior = real_load
            print(f"seed {seed}: samples in {a.out}/plain-seed{seed} and {a.out}/critic-seed{seed}")


if __name__ == "__main__":
    main()
