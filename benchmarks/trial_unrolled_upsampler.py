"""Trial: the upsampler fine-tuned on its own draws (step-unrolled denoising, SUNDAE, Savinov et al. 2022).
In training the upsampler sees real codes around the masked ones; in sampling it sees its own earlier
draws, which disagree. Here each step adds a second loss: a cosine-scheduled share of each grid is masked
and filled by the upsampler's own one-pass draw (no gradient), and the upsampler learns to predict the
real codes at every position of that grid, so it learns to read, and correct, its own draws.

    python benchmarks/trial_unrolled_upsampler.py RUN --minutes M --out DIR [--seeds S ...] [--samples N]

RUN holds a 64x64 VQ-VAE and its upsampler (left unchanged; the fine-tuned copy is DIR/upsampler.safetensors).
Prints the dark-line share of held-out slices' own layouts upsampled before and after, writes
DIR/real_layout.png and, with --samples, DIR/unrolled-seedS sample folders for `oasisvq evaluate-samples`.
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
from tqdm.auto import tqdm

from oasisvq import data, figures, sampling
from oasisvq.download import OASIS_CREDIT
from oasisvq.evaluation.generation import dark_lines
from oasisvq.models.priors import _inverse_cdf, mask_ratio
from oasisvq.prior import decode_uint8, load_prior
from oasisvq.tokenizer import load_model


@torch.no_grad()
def encode_split(fine, coarse, slices, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    codes, layouts = [], []
    for b in tqdm(range(0, len(slices), batch), desc="encode", leave=False):
        x = slices.tensor(np.arange(b, min(b + batch, len(slices))))
        codes.append(fine.encode(x))
        layouts.append(decode_uint8(coarse, coarse.encode(x)))
    return torch.cat(codes), torch.cat(layouts)


def unrolled_loss(model, codes: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the real codes at every position of grids whose masked share the model filled itself."""
    n, h, w = codes.shape
    count = (mask_ratio(torch.rand(n)) * h * w).ceil().clamp(1, h * w)
    drawn = torch.rand(n, h * w).argsort(1).argsort(1) < count[:, None]
    seq = codes.reshape(n, h * w).masked_fill(drawn, model.mask_id)
    with torch.no_grad():
        model.eval()
        seq[drawn] = _inverse_cdf(model._run(seq, h, w, layout)[drawn].float(), None)
        model.train()
    logits = model._run(seq, h, w, layout)
    return F.cross_entropy(logits.reshape(-1, model.num_codes).float(), codes.reshape(-1))


def fine_tune(model, codes, layouts, minutes: float, batch: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, step, t0 = np.random.default_rng(0), 0, time.perf_counter()
    bar = tqdm(total=round(minutes * 60), desc="fine-tune", unit="s")
    while time.perf_counter() - t0 < minutes * 60:
        idx = torch.from_numpy(rng.choice(len(codes), batch, replace=False))
        model.train()
        masked = model.loss(codes[idx].long(), layouts[idx])
        unrolled = unrolled_loss(model, codes[idx].long(), layouts[idx])
        opt.zero_grad(set_to_none=True)
        (masked + unrolled).backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            bar.set_postfix(step=step, masked=f"{masked.item():.3f}", unrolled=f"{unrolled.item():.3f}")
            print(f"step {step}: masked loss {masked.item():.3f}, unrolled loss {unrolled.item():.3f}", flush=True)
        bar.update(max(0, min(round(time.perf_counter() - t0), bar.total) - bar.n))
    bar.close()
    model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--levels", nargs="+", type=float, default=[0.3, 0.45, 0.6, 0.75])
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    upsampler, meta = load_prior(a.run, "upsampler", "best", torch.device("cpu"))
    upsampler.eval()
    fine, cfg = load_model(a.run, "best")
    coarse, _ = load_model(meta["prior_config"]["coarse_run"], "best")
    slices = data.load_slices(cfg.data, None, progress=False)
    tuned = copy.deepcopy(upsampler)
    path = a.out / "upsampler.safetensors"
    if path.is_file():
        tuned.load_state_dict(load_file(path))
    else:
        codes, layouts = encode_split(fine, coarse, slices.split("train"))
        fine_tune(tuned, codes, layouts, a.minutes, a.batch_size, a.lr)
        save_file(tuned.state_dict(), str(path))
    tuned.eval()
    grid = tuple(meta["grid"])
    for split in ("test", "validate"):  # as benchmarks/dark_lines.py --upsampled: 64 slices of the split
        part = slices.split(split)
        chosen = np.sort(np.random.default_rng(0).permutation(len(part))[:64])
        shares = {"real": [], "before": [], "after": []}
        gens = {"before": torch.Generator().manual_seed(1), "after": torch.Generator().manual_seed(1)}
        with torch.no_grad():
            for b in range(0, len(chosen), 16):
                x = torch.from_numpy(part.uint8(chosen[b:b + 16])).float().div(255)[:, None]
                lay = decode_uint8(coarse, coarse.encode(x))
                shares["real"] += [dark_lines(i) for i in x[:, 0].numpy()]
                for name, model in (("before", upsampler), ("after", tuned)):
                    img = decode_uint8(fine, model.sample(len(x), grid, generator=gens[name], cond=lay))
                    shares[name] += [dark_lines(i) for i in img[:, 0].numpy().astype(np.float32) / 255]
        print(f"{split} subject, real layouts of 64 slices: " +
              ", ".join(f"{k} {np.mean(v):.3f}" for k, v in shares.items()), flush=True)
    held = slices.split("validate")
    pick = held.nearest_levels(a.levels)
    with torch.no_grad():
        x = torch.from_numpy(held.uint8(pick)).float().div(255)[:, None]
        layout = decode_uint8(coarse, coarse.encode(x))
        rows = [held.uint8(pick), layout[:, 0].numpy(), decode_uint8(fine, fine.encode(x))[:, 0].numpy()]
        names = ["real", "coarse recon (read)", "fine recon (target)"]
        for name, model in (("upsampler", upsampler), ("fine-tuned on its draws", tuned)):
            codes = model.sample(len(pick), grid, generator=torch.Generator().manual_seed(1), cond=layout)
            rows.append(decode_uint8(fine, codes)[:, 0].numpy())
            names.append(name)
    titles = [f"real, level {held.position[i]:.2f}" for i in pick] + [nm for nm in names[1:] for _ in pick]
    figures.slice_grid(np.concatenate(rows), a.out / "real_layout.png", titles=titles, cols=len(pick),
                       title="upsampler given the real layout, before and after unrolled fine-tuning (validate subject)",
                       footer=f"Real slices: {OASIS_CREDIT}")
    if a.samples:
        real_load = sampling.load_prior

        def load_tuned(*args, **kw):
            model, m = real_load(*args, **kw)
            if m["prior_config"]["kind"] == "upsampler":
                model.load_state_dict(tuned.state_dict())
            return model, m

        sampling.load_prior = load_tuned
        try:
            for seed in a.seeds:
                sampling.sample(a.run, "upsampler", n=a.samples, level=(0.0, 1.0), seed=seed, steps=32,
                                out=a.out / f"unrolled-seed{seed}", progress=False)
        finally:
            sampling.load_prior = real_load


if __name__ == "__main__":
    main()
