"""oasisvq's VQ-VAE against two peers on the same data, image size, latent grid and wall-clock budget.

    python benchmarks/peers.py --checkpoints 5,10,20     # training: SSIM at each budget, images/s, memory
    python benchmarks/peers.py --sampling 64             # prior sampling speed (transformer, PixelCNN, MONAI)

Peers:
- ``keras``: the Keras VQ-VAE example (keras.io/examples/generative/vq_vae) reimplemented in PyTorch: two
  stride-2 3x3 convs (32, 64, ReLU, TF 'same' padding), a 1x1 conv to latent dim 16, 64 codes, non-EMA VQ
  (codebook loss + 0.25 x commitment loss, straight-through), mirrored transposed-conv decoder, inputs in
  [-0.5, 0.5], loss MSE / training-data variance + VQ loss, Adam lr 1e-3.
- ``monai``: ``monai.networks.nets.VQVAE`` as in MONAI's 2D VQ-VAE tutorial (channels (256, 256), 2 residual
  layers of 256, 256 codes of dim 32, EMA codebook, L1 + quantisation loss, Adam lr 1e-4). Needs
  ``pip install monai`` in the benchmark environment (not an oasisvq dependency); skipped otherwise.

All three see 256x256 slices with a 64x64 code grid (downsample 4). Training data: the t88 PNG train split +
the train subjects of the MNI volumes; held out: the 20 t88 test slices (whole-slice SSIM, Wang settings).
Every model runs in its own process, so peak RSS (resource.getrusage) is per model. Budgets are cumulative
training minutes; evaluation time is not counted. The same script also reports forward FLOPs per image
(torch.utils.flop_counter), the CPU's measured fp32 matmul peak, and the fraction of it each model reaches.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DATA = Path(os.environ.get("OASISVQ_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SIZE = 256


# ------------------------------------------------------------------------------------------- Keras port


class KerasVQ(nn.Module):
    """keras.io VectorQuantizer: uniform(-0.05, 0.05) init, loss = beta * commitment + codebook loss."""

    def __init__(self, num_embeddings: int = 64, embedding_dim: int = 16, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.embeddings = nn.Parameter(torch.empty(embedding_dim, num_embeddings).uniform_(-0.05, 0.05))

    def forward(self, x: torch.Tensor):
        n, d, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(-1, d)
        dist = flat.pow(2).sum(1, keepdim=True) + self.embeddings.pow(2).sum(0) - 2 * flat @ self.embeddings
        idx = dist.argmin(1)
        q = self.embeddings.t()[idx].view(n, h, w, d).permute(0, 3, 1, 2)
        commitment = F.mse_loss(q.detach(), x)
        codebook = F.mse_loss(q, x.detach())
        q = x + (q - x).detach()
        return q, self.beta * commitment + codebook, idx


class SamePadConv(nn.Conv2d):
    """TF/Keras padding='same' for a stride-2 3x3 conv: pad 0 before, 1 after."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class KerasVQVAE(nn.Module):
    def __init__(self, latent_dim: int = 16, num_embeddings: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(SamePadConv(1, 32, 3, stride=2), nn.ReLU(), SamePadConv(32, 64, 3, stride=2),
                                     nn.ReLU(), nn.Conv2d(64, latent_dim, 1))
        self.vq = KerasVQ(num_embeddings, latent_dim)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 64, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 3, padding=1))

    def forward(self, x):
        q, vq_loss, _ = self.vq(self.encoder(x))
        return self.decoder(q), vq_loss


# ------------------------------------------------------------------------------------------------ models


def build(name: str, variance: float):
    """(model, step_fn(x01) -> loss, reconstruct_fn(x01) -> recon01, optimizer)."""
    if name == "keras":
        model = KerasVQVAE()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def loss_fn(x):
            xs = x - 0.5
            recon, vq_loss = model(xs)
            return F.mse_loss(recon, xs) / variance + vq_loss

        def recon_fn(x):
            return (model(x - 0.5)[0] + 0.5).clamp(0, 1)

        return model, loss_fn, recon_fn, opt
    if name == "monai":
        from monai.networks.nets import VQVAE

        model = VQVAE(spatial_dims=2, in_channels=1, out_channels=1, channels=(256, 256), num_res_channels=256,
                      num_res_layers=2, downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                      upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=256, embedding_dim=32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def loss_fn(x):
            recon, q_loss = model(x)
            return F.l1_loss(recon.float(), x) + q_loss

        def recon_fn(x):
            return model(x)[0].clamp(0, 1)

        return model, loss_fn, recon_fn, opt
    raise ValueError(name)


def forward_flops(model: nn.Module, fn) -> float:
    """Forward FLOPs of one 256x256 image (FlopCounterMode counts matmuls/convs: 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(torch.rand(1, 1, SIZE, SIZE))
    model.train(was)
    return float(fc.get_total_flops())


def matmul_peak(n: int = 2048, seconds: float = 2.0) -> float:
    """Measured fp32 matmul FLOP/s of this CPU with torch's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ workers


def _datasets(cache_dir):
    from oasisvq.config import DataConfig
    from oasisvq.data import load_slices

    train = load_slices(DataConfig(paths=[str(DATA / "oasis1_t88_axial"), str(DATA / "oasis1_mni_volumes")],
                                   size=SIZE), cache_dir=cache_dir, progress=False).split("train")
    test = load_slices(DataConfig(paths=[str(DATA / "oasis1_t88_axial")], size=SIZE), cache_dir=cache_dir,
                       progress=False).split("test")
    return train, test


@torch.no_grad()
def _held_out_ssim(recon_fn, model, test) -> float:
    from oasisvq.metrics import ssim

    model.eval()
    vals = []
    for s in range(0, len(test), 10):
        x = test.tensor(list(range(s, min(s + 10, len(test)))))
        vals += ssim(x, recon_fn(x).float()).tolist()
    model.train()
    return sum(vals) / len(vals)


def run_peer(name: str, budgets: list[float], batch_size: int, threads: int, cache_dir, out_q) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import numpy as np

    train, test = _datasets(cache_dir)
    variance = float(np.var(train.uint8(np.arange(len(train))).astype(np.float32) / 255))
    model, loss_fn, recon_fn, opt = build(name, variance)
    params = sum(p.numel() for p in model.parameters())
    flops = forward_flops(model, recon_fn)
    model.train()
    ssims, elapsed, seen, epoch = {}, 0.0, 0, 0
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train))
    pos = 0
    for budget in budgets:
        while elapsed < 60 * budget:
            if pos + batch_size > len(order):
                epoch += 1
                order, pos = rng.permutation(len(train)), 0
            x = train.tensor(order[pos:pos + batch_size])
            pos += batch_size
            t0 = time.perf_counter()
            loss = loss_fn(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            elapsed += time.perf_counter() - t0
            seen += batch_size
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"{name}: loss became {float(loss)}")
        ssims[budget] = _held_out_ssim(recon_fn, model, test)
    out_q.put({"model": name, "params": params, "images_per_s": seen / elapsed, "ssim": ssims,
               "fwd_flops": flops, "codes": model.vq.embeddings.shape[1] if name == "keras" else 256,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_oasisvq(name: str, budgets: list[float], batch_size: int, threads: int, cache_dir, out_dir, out_q) -> None:
    torch.set_num_threads(threads)
    import csv

    from oasisvq.config import DataConfig, RunConfig, TrainConfig, model_preset
    from oasisvq.tokenizer import load_model, train

    _, test = _datasets(cache_dir)
    cfg = RunConfig(data=DataConfig(paths=[str(DATA / "oasis1_t88_axial"), str(DATA / "oasis1_mni_volumes")],
                                    size=SIZE), model=model_preset("cpu"),
                    train=TrainConfig(epochs=0, max_minutes=budgets[0], batch_size=batch_size, device="cpu",
                                      evals_per_epoch=1, val_slices=32))
    ssims = {}
    for i, budget in enumerate(budgets):
        cfg.train.max_minutes = budget
        # each later budget resumes the run (the cosine schedule then stretches to the new budget)
        train(cfg, out_dir, resume=i > 0, overwrite=i == 0, cache_dir=cache_dir, progress=False)
        model, _ = load_model(out_dir, "last")
        ssims[budget] = _held_out_ssim(lambda x, m=model: m.decode_indices(m.encode(x)), model, test)
    model, _ = load_model(out_dir, "last")
    with open(Path(out_dir) / "metrics.csv", newline="") as f:
        ips = float(list(csv.DictReader(f))[-1]["images_per_s"])
    out_q.put({"model": "oasisvq (cpu preset)", "params": sum(p.numel() for p in model.parameters()),
               "images_per_s": ips, "ssim": ssims, "codes": model.cfg.num_codes,
               "fwd_flops": forward_flops(model, lambda x: model.decode_indices(model.encode(x))),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _in_process(target, *args) -> dict | None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        print(f"  {args[0]}: worker failed (exit code {p.exitcode})", file=sys.stderr)
        return None
    return q.get()


# ------------------------------------------------------------------------------------------- prior sampling


class _TokensOnly:
    """Stands in for MONAI's VQVAE inside VQVAETransformerInferer.sample so that only the prior's token
    sampling is timed (the decoder is timed for nobody)."""

    def __init__(self, num_codes: int):
        self.num_embeddings = num_codes

    def decode_samples(self, latent):
        return latent


def _best_of_threads(fn, threads: int) -> tuple[float, int, dict[int, float]]:
    """Seconds of fn() at 1 thread and at `threads`: autoregressive sampling is many tiny ops, and which
    count is faster depends on the model; each model gets its faster one."""
    times = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        t0 = time.perf_counter()
        fn()
        times[t] = time.perf_counter() - t0
    best = min(times, key=times.get)
    return times[best], best, times


def sampling_speed(n: int, grid: int, num_codes: int, threads: int, monai_n: int) -> list[dict]:
    """Seconds to sample n code grids of grid x grid from priors of equal size (oasisvq defaults: 4 layers,
    width 128, 4 heads) with random weights: the time does not depend on what a prior has learned."""
    from oasisvq.models.priors import PriorConfig, build_prior

    rows = []
    for kind in ("transformer", "pixelcnn"):
        torch.manual_seed(0)
        prior = build_prior(PriorConfig(kind=kind), num_codes, (grid, grid)).eval()
        count = n if kind == "transformer" else max(1, n // 8)  # PixelCNN: a few grids say its rate
        with torch.no_grad():
            s, t, times = _best_of_threads(lambda p=prior, k=count: p.sample(k, (grid, grid)), threads)
        rows.append({"model": f"oasisvq {kind}" + (" (KV cache)" if kind == "transformer" else ""),
                     "n": count, "seconds": s, "threads": t, "times": times})
    try:
        from monai.inferers import VQVAETransformerInferer
        from monai.networks.nets import DecoderOnlyTransformer
        from monai.utils.ordering import Ordering, OrderingType
    except ImportError:
        print("MONAI sampling skipped: `import monai` failed")
        return rows
    cfg = PriorConfig()
    torch.manual_seed(0)
    tf = DecoderOnlyTransformer(num_tokens=num_codes + 1, max_seq_len=grid * grid + 1, attn_layers_dim=cfg.width,
                                attn_layers_depth=cfg.layers, attn_layers_heads=cfg.heads).eval()
    order = Ordering(ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=2, dimensions=(1, grid, grid))
    start = torch.full((monai_n, 1), num_codes)
    s, t, times = _best_of_threads(lambda: VQVAETransformerInferer().sample(
        (grid, grid), start, _TokensOnly(num_codes), tf, order, verbose=False), threads)
    rows.append({"model": "MONAI DecoderOnlyTransformer + VQVAETransformerInferer", "n": monai_n, "seconds": s,
                 "threads": t, "times": times})
    return rows


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (used when --checkpoints is not given)")
    p.add_argument("--checkpoints", default="", help="comma-separated cumulative budgets in minutes, e.g. 5,10,20")
    p.add_argument("--peers", default="keras,monai")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/bench-peers"))
    p.add_argument("--sampling", type=int, default=0, metavar="N",
                   help="instead of training: time sampling N code grids (32x32, 512 codes) from each prior")
    p.add_argument("--monai-samples", type=int, default=4, help="grids for MONAI's (uncached) sampler")
    a = p.parse_args()
    if a.sampling:
        rows = sampling_speed(a.sampling, 32, 512, a.threads, a.monai_samples)
        machine = _machine()
        print(f"\nmachine: {machine}; prior sampling only (decoding excluded), 32x32 grids, 512 codes, random "
              f"weights, 4 layers / width 128 / 4 heads")
        print("| prior | grids | seconds (best) | grids/s | seconds per thread count |\n|---|---|---|---|---|")
        for r in rows:
            per = ", ".join(f"{t} thr: {v:.1f}" for t, v in r["times"].items())
            print(f"| {r['model']} | {r['n']} | {r['seconds']:.1f} | {r['n'] / r['seconds']:.3f} | {per} |")
        ours = rows[0]["n"] / rows[0]["seconds"]
        for r in rows[1:]:
            print(f"oasisvq transformer / {r['model']}: {ours / (r['n'] / r['seconds']):.1f}x grids/s")
        return

    if not (DATA / "oasis1_t88_axial").is_dir() or not (DATA / "oasis1_mni_volumes").is_dir():
        raise SystemExit(f"benchmark skipped: real data not found under {DATA} (set OASISVQ_SHARED_DATA)")
    budgets = sorted(float(b) for b in a.checkpoints.split(",")) if a.checkpoints else [a.minutes]
    _datasets(a.cache_dir)  # build the slice caches once, before the timed workers
    torch.set_num_threads(a.threads)
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3, {a.threads} threads): {peak / 1e9:.1f} GFLOP/s")

    results = []
    r = _in_process(run_oasisvq, "oasisvq", budgets, a.batch_size, a.threads, a.cache_dir, str(a.out / "oasisvq"))
    if r:
        results.append(r)
    for peer in [p for p in a.peers.split(",") if p]:
        if peer == "monai":
            try:
                import monai  # noqa: F401
            except ImportError:
                print("peer monai skipped: `import monai` failed. Install it into the benchmark environment only: "
                      "pip install monai (it is not an oasisvq dependency)")
                continue
        r = _in_process(run_peer, peer, budgets, a.batch_size, a.threads, a.cache_dir)
        if r:
            results.append(r)

    machine = _machine()
    print(f"\nmachine: {machine}; {SIZE}x{SIZE} slices, 64x64 code grid, batch {a.batch_size}, "
          f"budgets {budgets} min of training time")
    cols = ["model", "params", "codes", "train img/s"] + [f"SSIM @{b:g} min" for b in budgets] + \
        ["fwd GFLOP/img", "train GFLOP/s (3x fwd)", "of matmul peak", "peak RSS MB"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        rate = 3 * r["fwd_flops"] * r["images_per_s"]
        print(f"| {r['model']} | {r['params'] / 1e6:.3f}M | {r['codes']} | {r['images_per_s']:.1f} | "
              + " | ".join(f"{r['ssim'][b]:.4f}" for b in budgets)
              + f" | {r['fwd_flops'] / 1e9:.2f} | {rate / 1e9:.1f} | {rate / peak:.1%} | {r['peak_rss_mb']:.0f} |")
    if results and results[0]["model"].startswith("oasisvq"):
        ours = results[0]
        for r in results[1:]:
            ratios = ", ".join(f"SSIM@{b:g} {ours['ssim'][b] / r['ssim'][b]:.3f}" for b in budgets)
            print(f"oasisvq / {r['model']}: img/s {ours['images_per_s'] / r['images_per_s']:.2f}, {ratios}, "
                  f"params {ours['params'] / r['params']:.2f}, peak RSS {ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "peers.json").write_text(json.dumps({"machine": machine, "matmul_peak_flops": peak, "budgets": budgets,
                                                  "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
