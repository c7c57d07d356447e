"""What grouping codes into attention tokens buys a MaskGIT prior: seconds per training step and per
sample (12 decoding passes) on a 16x16 grid and on a 32x32 grid with 1x1 and 2x2 codes per token, each
beside the ungrouped 32x32 MaskGIT measured in the same run. Random codes (speed does not depend on them).

    python benchmarks/prior_speed.py --threads 1 --batch-size 16 --steps 5
"""

from __future__ import annotations

import argparse
import time

import torch

from oasisvq.models.priors import MaskGITPrior

CASES = [((16, 16), 1), ((32, 32), 1), ((32, 32), 2)]  # (code grid, codes per token side)


def seconds_per_step(model: MaskGITPrior, grids: torch.Tensor, cond: torch.Tensor, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0 = time.perf_counter()
        loss = model.loss(grids, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--codes", type=int, default=512)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for grid, group in CASES:
        torch.manual_seed(0)
        model = MaskGITPrior(a.codes, grid, width=a.width, layers=4, heads=4, num_classes=8, group=group).train()
        grids = torch.randint(0, a.codes, (a.batch_size, *grid))
        cond = torch.randint(0, 8, (a.batch_size,))
        train = seconds_per_step(model, grids, cond, a.steps)
        model.eval()
        t0 = time.perf_counter()
        model.sample(a.batch_size, grid, generator=torch.Generator().manual_seed(0), cond=cond)
        sample = (time.perf_counter() - t0) / a.batch_size
        rows.append((f"{grid[0]}x{grid[1]}", group, sum(q.numel() for q in model.parameters()), train, sample))
    peer = next(r for r in rows if r[0] == "32x32" and r[1] == 1)
    print(f"MaskGIT, 4 layers, width {a.width}, {a.codes} codes, batch {a.batch_size}, {a.threads} threads, "
          f"torch {torch.__version__}")
    print("| grid | codes per token | parameters | s / training step | x ungrouped 32x32 | s / sample | "
          "x ungrouped 32x32 |")
    print("|---|---|---|---|---|---|---|")
    for grid, group, params, train, sample in rows:
        print(f"| {grid} | {group}x{group} | {params / 1e6:.2f} M | {train:.3f} | {train / peer[3]:.2f} | "
              f"{sample:.3f} | {sample / peer[4]:.2f} |")


if __name__ == "__main__":
    main()
