"""Autoregressive priors over VQ-VAE code grids: a gated PixelCNN and a small decoder-only transformer.

Both read a grid of code indices ``(N, h, w)`` in raster order (row by row, left to right) and share one
interface:

* ``forward(indices, cond=None) -> logits (N, K, h, w)``: the logits at position i depend only on the
  codes before i (and on the class label ``cond``, when the prior is conditional);
* ``sample(n, grid_hw, temperature=1.0, top_k=0, generator=None, cond=None) -> (n, h, w)`` long.

Sampling draws one uniform number per position from ``generator`` and inverts the cumulative
distribution, so a seed fixes the result and the cached and uncached transformer paths consume the
random stream identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

PRIOR_KINDS = ("transformer", "pixelcnn")


@dataclass
class PriorConfig:
    kind: str = "transformer"  # transformer | pixelcnn
    layers: int = 4
    width: int = 128  # transformer embedding size / PixelCNN channels
    heads: int = 4  # transformer only
    num_classes: int = 0  # 0: unconditional; else cond is an int in [0, num_classes)
    dropout: float = 0.0  # > 0 makes CPU attention fall back to a slow path (measured 5x per step)
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    max_minutes: float = 0.0  # > 0: stop training after this much wall-clock time
    seed: int = 0
    kernel: int = 5  # PixelCNN only: kernel width (odd)
    init_from_codebook: bool = True  # initialise the code embedding from the VQ-VAE codebook

    def validate(self) -> PriorConfig:
        if self.kind not in PRIOR_KINDS:
            raise ConfigError(f"prior kind must be one of {', '.join(PRIOR_KINDS)}, got {self.kind!r}")
        for name in ("layers", "width", "heads", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"prior.{name} must be positive, got {getattr(self, name)}")
        if self.kind == "transformer" and self.width % self.heads:
            raise ConfigError(f"prior.width {self.width} must be divisible by prior.heads {self.heads}")
        if self.kind == "pixelcnn" and (self.kernel < 3 or self.kernel % 2 == 0):
            raise ConfigError(f"prior.kernel must be an odd number >= 3, got {self.kernel}")
        if self.num_classes < 0:
            raise ConfigError(f"prior.num_classes must be >= 0, got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"prior.dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ConfigError(f"prior.lr must be positive, got {self.lr}")
        if self.epochs <= 0 and self.max_minutes <= 0:
            raise ConfigError("prior.epochs or prior.max_minutes must be positive")
        return self


def _check_cond(cond: torch.Tensor | None, n: int, num_classes: int) -> None:
    if num_classes == 0:
        if cond is not None:
            raise ValueError("this prior is unconditional; cond must be None")
        return
    if cond is None:
        raise ValueError(f"this prior is conditional; cond (N,) in [0, {num_classes}) is required")
    if cond.shape != (n,):
        raise ValueError(f"cond must have shape ({n},), got {tuple(cond.shape)}")
    if n and (int(cond.min()) < 0 or int(cond.max()) >= num_classes):
        raise ValueError(f"cond values must lie in [0, {num_classes})")


def _draw(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
          ) -> torch.Tensor:
    """One code per row of ``logits (N, K)``, by inverse-CDF sampling with one uniform per row."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max(logits.shape[-1] - 1).squeeze(1)


def _codebook_embedding(codebook: torch.Tensor, width: int, std: float) -> torch.Tensor:
    """Map a (K, D) codebook to (K, width) embeddings that keep its geometry, scaled to ``std``."""
    cb = codebook.float()
    cb = cb - cb.mean(0)
    d = cb.shape[1]
    if d != width:  # a fixed random projection roughly preserves distances between codes
        g = torch.Generator().manual_seed(0)
        cb = cb @ (torch.randn(d, width, generator=g) / math.sqrt(width))
    return cb * (std / cb.std().clamp_min(1e-8))


# --------------------------------------------------------------------------------------------------
# Gated PixelCNN (van den Oord et al. 2016): vertical + horizontal stacks, no blind spot.
#
# The masks are realised by padding instead of zeroed weights: the vertical stack's kernel covers the
# current row and the k//2 rows above (padding on top only), the horizontal stack's kernel covers the
# current column and the k//2 columns to its left. The vertical features reach the horizontal stack
# shifted down by one row, so they see only rows strictly above. Mask type A (first layer) additionally
# shifts the horizontal features right by one column so a position never sees its own input.
# --------------------------------------------------------------------------------------------------


def _shift_down(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class GatedBlock(nn.Module):
    def __init__(self, ch: int, kernel: int, mask_type: str, num_classes: int, dropout: float):
        super().__init__()
        self.k, self.mask_a = kernel // 2, mask_type == "A"
        self.v = nn.Conv2d(ch, 2 * ch, (self.k + 1, kernel))
        self.h = nn.Conv2d(ch, 2 * ch, (1, self.k + 1))
        self.v_to_h = nn.Conv2d(2 * ch, 2 * ch, 1)
        self.h_out = nn.Conv2d(ch, ch, 1)
        self.cond = nn.Embedding(num_classes, 4 * ch) if num_classes else None
        self.drop = nn.Dropout(dropout)

    @staticmethod
    def _gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k
        vf = self.v(F.pad(v, (k, k, k, 0)))  # rows r-k..r, columns c-k..c+k
        hf = self.h(F.pad(h, (k, 0, 0, 0)))  # row r, columns c-k..c
        if self.mask_a:
            hf = _shift_right(hf)  # columns c-k-1..c-1: never the position itself
        hf = hf + self.v_to_h(_shift_down(vf))  # rows strictly above
        if self.cond is not None:
            cv, ch = self.cond(cond)[:, :, None, None].chunk(2, dim=1)
            vf, hf = vf + cv, hf + ch
        h_new = self.h_out(self.drop(self._gate(hf)))
        return self._gate(vf), (h_new if self.mask_a else h + h_new)


class GatedPixelCNN(nn.Module):
    def __init__(self, num_codes: int, width: int = 128, layers: int = 8, kernel: int = 5,
                 num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        self.num_codes, self.num_classes = num_codes, num_classes
        self.embed = nn.Embedding(num_codes, width)
        self.blocks = nn.ModuleList(
            GatedBlock(width, kernel, "A" if i == 0 else "B", num_classes, dropout) for i in range(layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, num_codes, 1))

    def init_from_codebook(self, codebook: torch.Tensor) -> None:
        with torch.no_grad():
            self.embed.weight.copy_(_codebook_embedding(codebook, self.embed.embedding_dim, 1.0))

    def forward_embedded(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded grid (N, width, h, w) -> logits (N, K, h, w)."""
        v = h = x
        for block in self.blocks:
            v, h = block(v, h, cond)
        return self.head(h)

    def forward(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        _check_cond(cond, indices.shape[0], self.num_classes)
        return self.forward_embedded(self.embed(indices).permute(0, 3, 1, 2), cond)

    @torch.no_grad()
    def sample(self, n: int, grid_hw: tuple[int, int], temperature: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        h, w = grid_hw
        dev = self.embed.weight.device
        _check_cond(cond, n, self.num_classes)
        out = torch.zeros(n, h, w, dtype=torch.long, device=dev)
        # Row r depends only on rows r - reach .. r (receptive field), so only those rows are computed.
        reach = sum(b.k for b in self.blocks) + 1
        for r in range(h):
            top = max(0, r - reach)
            for c in range(w):
                logits = self.forward_embedded(self.embed(out[:, top:r + 1]).permute(0, 3, 1, 2), cond)
                out[:, r, c] = _draw(logits[:, :, -1, c], temperature, top_k, generator)
        return out


# --------------------------------------------------------------------------------------------------
# Decoder-only transformer over the raster sequence (nanoGPT style, pre-LN) with a KV cache.
# Input at step t is the code of position t-1 (a learned start token at t = 0) plus the row and column
# embeddings of position t, so every position, including the first, is predicted.
# --------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cache_len = 0

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, 2))
        if use_cache:  # append this step's keys/values and attend to everything cached so far
            ck, cv = self.cache
            ck[:, :, self.cache_len:self.cache_len + t] = k
            cv[:, :, self.cache_len:self.cache_len + t] = v
            self.cache_len += t
            k, v = ck[:, :, :self.cache_len], cv[:, :, :self.cache_len]
            causal = t > 1  # with t == 1 the single query may see every cached key
            if causal and self.cache_len != t:
                raise ValueError("multi-token cached steps are only supported from an empty cache")
        else:
            causal = True
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), use_cache))
        return x + self.mlp(self.ln2(x))


class TransformerPrior(nn.Module):
    def __init__(self, num_codes: int, grid: tuple[int, int], width: int = 128, layers: int = 4,
                 heads: int = 4, num_classes: int = 0, dropout: float = 0.0):
        super().__init__()
        self.num_codes, self.num_classes, self.grid = num_codes, num_classes, tuple(grid)
        self.tok = nn.Embedding(num_codes, width)
        self.start = nn.Parameter(torch.zeros(width))
        self.row = nn.Embedding(grid[0], width)
        self.col = nn.Embedding(grid[1], width)
        self.cls = nn.Embedding(num_classes, width) if num_classes else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_codes, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 scaling of residual projections
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def init_from_codebook(self, codebook: torch.Tensor) -> None:
        with torch.no_grad():
            self.tok.weight.copy_(_codebook_embedding(codebook, self.tok.embedding_dim, 0.02))

    def _pos(self, h: int, w: int, start: int, length: int) -> torch.Tensor:
        if h > self.grid[0] or w > self.grid[1]:
            raise ValueError(f"grid {h}x{w} is larger than the prior's {self.grid[0]}x{self.grid[1]}")
        p = torch.arange(start, start + length, device=self.start.device)
        return self.row(p // w) + self.col(p % w)

    def _inputs(self, prev: torch.Tensor | None, n: int, cond: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings for ``prev`` (N, t) codes, preceded by the start token when prev is None."""
        x = self.start.expand(n, 1, -1) if prev is None else self.tok(prev)
        if self.cls is not None:
            x = x + self.cls(cond)[:, None, :]
        return x

    def _run(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, use_cache)
        return self.head(self.ln_f(x))

    def forward(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        n, h, w = indices.shape
        _check_cond(cond, n, self.num_classes)
        seq = indices.reshape(n, h * w)
        x = torch.cat([self._inputs(None, n, cond), self._inputs(seq[:, :-1], n, cond)], dim=1)
        logits = self._run(x + self._pos(h, w, 0, h * w))
        return logits.transpose(1, 2).reshape(n, self.num_codes, h, w)

    def _reset_cache(self, n: int, length: int) -> None:
        for b in self.blocks:
            a = b.attn
            shape = (n, a.heads, length, self.start.numel() // a.heads)
            a.cache = (self.start.new_zeros(shape), self.start.new_zeros(shape))
            a.cache_len = 0

    def _clear_cache(self) -> None:
        for b in self.blocks:
            b.attn.cache, b.attn.cache_len = None, 0

    @torch.no_grad()
    def cached_logits(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits computed one position at a time through the KV cache (for checking)."""
        n, h, w = indices.shape
        _check_cond(cond, n, self.num_classes)
        seq, out = indices.reshape(n, h * w), []
        self._reset_cache(n, h * w)
        try:
            for t in range(h * w):
                x = self._inputs(None if t == 0 else seq[:, t - 1:t], n, cond)
                out.append(self._run(x + self._pos(h, w, t, 1), use_cache=True)[:, 0])
        finally:
            self._clear_cache()
        return torch.stack(out, 2).reshape(n, self.num_codes, h, w)

    @torch.no_grad()
    def sample(self, n: int, grid_hw: tuple[int, int], temperature: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None, cond: torch.Tensor | None = None,
               use_cache: bool = True) -> torch.Tensor:
        h, w = grid_hw
        _check_cond(cond, n, self.num_classes)
        out = torch.zeros(n, h * w, dtype=torch.long, device=self.start.device)
        if use_cache:
            self._reset_cache(n, h * w)
        try:
            for t in range(h * w):
                if use_cache:
                    x = self._inputs(None if t == 0 else out[:, t - 1:t], n, cond)
                    logits = self._run(x + self._pos(h, w, t, 1), use_cache=True)[:, -1]
                else:
                    x = self._inputs(None, n, cond)
                    if t:
                        x = torch.cat([x, self._inputs(out[:, :t], n, cond)], dim=1)
                    logits = self._run(x + self._pos(h, w, 0, t + 1))[:, -1]
                out[:, t] = _draw(logits, temperature, top_k, generator)
        finally:
            self._clear_cache()
        return out.view(n, h, w)


def build_prior(cfg: PriorConfig, num_codes: int, grid: tuple[int, int]) -> nn.Module:
    """A prior for ``num_codes`` codes on an ``grid`` = (h, w) code grid, as ``cfg`` describes."""
    cfg.validate()
    if cfg.kind == "transformer":
        return TransformerPrior(num_codes, grid, cfg.width, cfg.layers, cfg.heads, cfg.num_classes, cfg.dropout)
    return GatedPixelCNN(num_codes, cfg.width, cfg.layers, cfg.kernel, cfg.num_classes, cfg.dropout)
