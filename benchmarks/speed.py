"""Does ``torch.compile`` pay back for the oasisvq VQ-VAE on this machine? Times eager training steps, the
first compiled steps (compilation) and compiled steady-state steps, and says after how many steps the
compile time is earned back. Also prints forward FLOPs per image and the fraction of the measured fp32
matmul peak a training step reaches.

    python benchmarks/speed.py --preset cpu --batch-size 16 --steps 5
"""

from __future__ import annotations

import argparse
import time

import torch

from oasisvq.config import model_preset
from oasisvq.models import VQVAE


def step_time(model, opt, x, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        _, losses = model(x)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from peers import matmul_peak

    torch.manual_seed(0)
    # channels_last, as the training loop uses it (measured faster on CPU too)
    x = torch.rand(a.batch_size, 1, a.size, a.size).contiguous(memory_format=torch.channels_last)
    model = VQVAE(model_preset(a.preset)).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(x)  # codebook init
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        _, losses = model(x)
        losses["loss"].backward()
    train_flops = fc.get_total_flops() / a.batch_size
    peak = matmul_peak()
    step_time(model, opt, x, 1)
    eager = step_time(model, opt, x, a.steps)
    print(f"{a.preset} preset, batch {a.batch_size} x {a.size}^2, {a.threads} threads, torch {torch.__version__}")
    print(f"train FLOPs per image (fwd+bwd, counted): {train_flops / 1e9:.2f} GFLOP; matmul peak {peak / 1e9:.1f} "
          f"GFLOP/s; eager step {eager:.3f} s = {a.batch_size / eager:.1f} img/s = "
          f"{train_flops * a.batch_size / eager / peak:.1%} of peak")
    print("| variant | compile s (first 2 steps) | s/step | img/s | x eager | pays back after |\n|---|---|---|---|---|---|")
    print(f"| eager | - | {eager:.3f} | {a.batch_size / eager:.1f} | 1.00 | - |")
    for variant in ("encoder+decoder", "whole model"):
        torch.manual_seed(0)
        m = VQVAE(model_preset(a.preset)).to(memory_format=torch.channels_last).train()
        m.load_state_dict(model.state_dict())
        o = torch.optim.AdamW(m.parameters(), lr=1e-4)
        if variant == "whole model":
            m.compile()
        else:  # the quantiser (data-dependent init and restarts) stays eager
            m.encoder.compile()
            m.decoder.compile()
        t0 = time.perf_counter()
        step_time(m, o, x, 2)
        first = time.perf_counter() - t0
        fast = step_time(m, o, x, a.steps)
        gain = eager - fast
        payback = f"{(first - 2 * fast) / gain:.0f} steps ({(first - 2 * fast) / gain * eager / 60:.1f} min)" \
            if gain > 0 else "never"
        print(f"| {variant} | {first:.1f} | {fast:.3f} | {a.batch_size / fast:.1f} | {eager / fast:.2f} | {payback} |")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
