"""Vector quantiser with EMA codebook updates, dead-code restart and straight-through gradients.

The distance, assignment and EMA arithmetic run in fp32 even under autocast: bf16 distances pick wrong
codes. Under DistributedDataParallel the EMA statistics are all-reduced and restarts draw from every
rank's encodings as one process would, so every rank holds the same codebook after every step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def _random_rows(flat: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` random rows of the encodings, the same on every rank. Under DDP they are drawn from the rows of
    all ranks together (rank order), exactly as one process holding the whole global batch would draw them."""
    if not _distributed():
        return flat[torch.randint(0, flat.shape[0], (n,), device=flat.device)].clone()
    rank, world = dist.get_rank(), dist.get_world_size()
    size = torch.tensor([flat.shape[0]], device=flat.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    start = int(sum(int(s) for s in sizes[:rank]))
    pick = torch.randint(0, int(sum(int(s) for s in sizes)), (n,), device=flat.device)
    dist.broadcast(pick, 0)
    mine = (pick >= start) & (pick < start + flat.shape[0])
    out = torch.zeros(n, flat.shape[1], device=flat.device, dtype=flat.dtype)
    out[mine] = flat[pick[mine] - start]
    dist.all_reduce(out)  # each row comes from exactly one rank
    return out


class VectorQuantizer(nn.Module):
    """Maps (N, D, H, W) encodings to their nearest of ``num_codes`` codes.

    Codes move by an exponential moving average of the encodings assigned to them (decay ``decay``);
    the encoder is pulled towards its codes by a commitment loss of weight ``beta``. A code that no
    encoding picked for ``dead_code_steps`` training steps is re-seeded from a random encoding of the
    current batch. The codebook is initialised from the first training batch's encodings.
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, beta: float = 0.25,
                 cosine: bool = False, dead_code_steps: int = 10, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.decay, self.beta, self.cosine = decay, beta, cosine
        self.dead_code_steps, self.eps = dead_code_steps, eps
        self.register_buffer("codebook", torch.randn(num_codes, dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _prepare(self, flat: torch.Tensor) -> torch.Tensor:
        return F.normalize(flat, dim=1) if self.cosine else flat

    def _codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1) if self.cosine else self.codebook

    def assign(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (M, D), computed in fp32."""
        codes = self._codes()
        dist_sq = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return dist_sq.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for an index grid (N, H, W) -> (N, D, H, W)."""
        return self._codes()[indices].permute(0, 3, 1, 2).contiguous()

    # Eager under torch.compile: codebook init and dead-code restarts branch on data, which would break the
    # graph (with warnings) anyway; the distance/EMA math is a small share of a step.
    @torch.compiler.disable
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (quantised z with straight-through gradient, indices (N, H, W), commitment loss, stats)."""
        n, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = self._prepare(z.permute(0, 2, 3, 1).reshape(-1, d))
            if self.training and not bool(self.initialized):
                self._init_from(flat.detach())
            idx = self.assign(flat.detach())
            counts = torch.bincount(idx, minlength=self.num_codes).float()
            if self.training:
                self._ema_update(flat.detach(), idx, counts)
            q_flat = self._codes()[idx]
            commit = self.beta * F.mse_loss(flat, q_flat.detach())
            q_flat = flat + (q_flat - flat).detach()  # straight-through estimator
            q = q_flat.view(n, h, w, d).permute(0, 3, 1, 2).contiguous()
            p = counts / counts.sum()
            stats = {
                "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()).detach(),
                "usage": (counts > 0).float().mean().detach(),
            }
        return q, idx.view(n, h, w), commit, stats

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        init = _random_rows(flat, self.num_codes)
        self.codebook.copy_(init)
        self.ema_sum.copy_(init)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.num_codes * self.eps) * total  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))

        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_unused >= self.dead_code_steps
        n_dead = int(dead.sum())
        if n_dead:
            fresh = _random_rows(flat, n_dead)
            self.codebook[dead] = fresh
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0
            self.steps_unused[dead] = 0
