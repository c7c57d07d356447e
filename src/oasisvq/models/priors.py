"""Priors over VQ-VAE code grids: a gated PixelCNN, a decoder-only transformer, a MaskGIT, and an
upsampler (fine codes given a coarser run's reconstruction of the same slice).

All read a grid of code indices ``(N, h, w)`` and share one interface:

* ``forward(indices, cond=None) -> logits (N, K, h, w)``. For the autoregressive priors (PixelCNN,
  transformer) the logits at raster position i depend only on the codes before i (row by row, left to
  right); MaskGIT is bidirectional and reads grids in which some codes are the ``[MASK]`` id;
* ``loss(indices, cond=None) -> scalar``: the training loss, mean cross-entropy in nats over the codes
  the prior predicts (all of them for the autoregressive priors, the masked ones for MaskGIT);
* ``sample(n, grid_hw, temperature=1.0, top_k=0, generator=None, cond=None, guidance=1.0) -> (n, h, w)``.

The upsampler's ``cond`` is a coarser run's reconstruction of the slice (N, 1, H, W). Conditional priors (``num_classes > 0``)
take ``cond`` (N,) in ``[0, num_classes]``, where ``num_classes``
is a learned null class ("no class"). A floating-point ``cond`` below ``num_classes`` is a fractional class
(``level_coordinates``: a slice level between two classes' centres), embedded by linear interpolation
between their embeddings (``LevelEmbedding``). In training mode each grid's class is replaced by the null class
with probability ``cond_dropout``, so one network learns both p(codes | class) and p(codes) and sampling
can use classifier-free guidance: ``l = l_uncond + guidance * (l_cond - l_uncond)``.

Sampling draws its random numbers from ``generator`` only (one uniform per sampled code, inverting the
cumulative distribution), so a seed fixes the result and the cached and uncached transformer paths
consume the random stream identically. Training randomness (masking, condition dropout) comes from
torch's global RNG, which the trainer saves and restores for an exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass
class PriorConfig:
    kind: str = "transformer"  # a key of PRIOR_KINDS: transformer | pixelcnn | maskgit | upsampler
    layers: int = 4
    width: int = 128  # transformer / MaskGIT embedding size, PixelCNN channels
    heads: int = 4  # transformer and MaskGIT
    num_classes: int = 0  # 0: unconditional; else cond is a class in [0, num_classes], num_classes: none
    # conditional priors: trained on each slice's exact level as a fractional class (level_coordinates) instead
    # of its bin; False in priors saved before this option (they learned bins, and sample from bins)
    interpolate_levels: bool = True
    dropout: float = 0.0  # on the embeddings and residual branches (not on attention weights: see SelfAttention)
    cond_dropout: float = 0.1  # conditional priors: P(class -> null class) per training grid, for guidance
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    max_minutes: float = 0.0  # > 0: stop training after this much wall-clock time
    max_steps: int = 0  # > 0: stop training after this many optimizer steps (as TrainConfig.max_steps)
    seed: int = 0
    kernel: int = 5  # PixelCNN and the autoregressive upsampler: kernel width (odd)
    decode_steps: int = 12  # MaskGIT and upsampler: parallel decoding passes per sample
    init_from_codebook: bool = True  # initialise the code embedding from the VQ-VAE codebook
    coarse_run: str = ""  # upsampler only: the run whose (coarser) reconstructions condition this prior
    coarse_prior: str = "maskgit"  # upsampler only: the coarse run's prior that samples the coarse codes
    patch: int = 0  # upsampler only: image pixels per side of one of the run's codes (set when training starts)
    # MaskGIT and upsampler: codes per side of one attention token (2: a 32x32 grid costs as a 16x16 one); an
    # upsampler with group > 1 attends over the whole grid (AttentionUpsamplerPrior) instead of convolving
    group: int = 1
    # upsampler only: draw the fine codes one by one in raster order (a gated PixelCNN reading the coarse
    # image) instead of in parallel masked passes
    autoregressive: bool = False
    # maskgit and upsampler: add the step-unrolled loss (MaskedPrior.losses), about twice the cost per step
    unrolled: bool = False
    # train also on this many tilted copies of every training volume (data.tilted_slices): more real
    # cross-sections for priors that overfit a few subjects; volumes only, not the upsampler
    tilts: int = 0

    def validate(self) -> PriorConfig:
        if self.kind not in PRIOR_KINDS:
            raise ConfigError(f"prior kind must be one of {', '.join(PRIOR_KINDS)}, got {self.kind!r}")
        for name in ("layers", "width", "heads", "batch_size", "decode_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"prior.{name} must be positive, got {getattr(self, name)}")
        if self.tilts < 0 or (self.tilts and self.kind == "upsampler"):
            raise ConfigError(f"prior.tilts must be >= 0, and 0 for the upsampler (its coarse images are not "
                              f"tilted); got {self.tilts} for {self.kind!r}")
        PRIOR_KINDS[self.kind].check_config(self)
        if self.group < 1 or (self.group > 1 and self.kind not in ("maskgit", "upsampler")):
            raise ConfigError(f"prior.group must be 1, or > 1 for the maskgit and upsampler priors only; got "
                              f"{self.group} for {self.kind!r}")
        if self.kind != "upsampler" and (self.coarse_run or self.autoregressive):
            raise ConfigError(f"prior.coarse_run and prior.autoregressive are for the upsampler prior only, "
                              f"not {self.kind!r}")
        if self.unrolled and (self.kind not in ("maskgit", "upsampler") or self.autoregressive):
            raise ConfigError(f"prior.unrolled is for the masked priors (maskgit, upsampler not autoregressive), "
                              f"not {self.kind!r}{' (autoregressive)' if self.autoregressive else ''}")
        if self.num_classes < 0:
            raise ConfigError(f"prior.num_classes must be >= 0, got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"prior.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.cond_dropout < 1:
            raise ConfigError(f"prior.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.lr <= 0:
            raise ConfigError(f"prior.lr must be positive, got {self.lr}")
        if self.epochs <= 0 and self.max_minutes <= 0 and self.max_steps <= 0:
            raise ConfigError("prior.epochs, prior.max_minutes or prior.max_steps must be positive")
        if self.max_steps < 0:
            raise ConfigError(f"prior.max_steps must be >= 0, got {self.max_steps}")
        return self


def _check_heads(cfg: PriorConfig) -> None:
    if cfg.width % cfg.heads:
        raise ConfigError(f"prior.width {cfg.width} must be divisible by prior.heads {cfg.heads}")


def _check_cond(cond: torch.Tensor | None, n: int, num_classes: int) -> None:
    if num_classes == 0:
        if cond is not None:
            raise ValueError("this prior is unconditional; cond must be None")
        return
    if cond is None:
        raise ValueError(f"this prior is conditional; cond (N,) in [0, {num_classes}] is required "
                         f"({num_classes}: the null class)")
    if cond.shape != (n,):
        raise ValueError(f"cond must have shape ({n},), got {tuple(cond.shape)}")
    if n and (float(cond.min()) < 0 or float(cond.max()) > num_classes):
        raise ValueError(f"cond values must lie in [0, {num_classes}] ({num_classes}: the null class)")


def level_coordinates(levels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Slice levels in [0, 1] -> fractional classes in [0, num_classes - 1]: class k's centre, level
    (k + 0.5) / num_classes, maps to k, and a level between two centres to a class between them."""
    return (levels.float() * num_classes - 0.5).clamp(0, num_classes - 1)


class LevelEmbedding(nn.Embedding):
    """The embedding of ``num_classes`` level classes and a null class (the last row). A fractional class
    (float) is embedded between its two neighbouring classes, linearly: a level between two bin centres, or
    in a stretch of levels no training slice had, gets a blend of the embeddings around it instead of its
    bin's. Whole classes (int) are looked up as by nn.Embedding."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if not cond.is_floating_point():
            return super().forward(cond)
        null = self.num_embeddings - 1
        lo = cond.floor().clamp(0, max(null - 1, 0))
        hi = (lo + 1).clamp_max(max(null - 1, 0))
        frac = (cond - lo).clamp(0, 1)[:, None]
        blend = self.weight[lo.long()] * (1 - frac) + self.weight[hi.long()] * frac
        return torch.where((cond == null)[:, None], self.weight[null], blend)


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """``logits (N, K)`` scaled by 1 / temperature, all but the ``top_k`` largest set to -inf (0: keep all)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _inverse_cdf(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One code per row of ``logits (N, K)``, by inverse-CDF sampling with one uniform per row."""
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max(logits.shape[-1] - 1).squeeze(1)


def _draw(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
          ) -> torch.Tensor:
    return _inverse_cdf(_filter_logits(logits, temperature, top_k), generator)


def guided_logits(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + w * (cond - uncond)``; w = 0 and w = 1 return an input as is
    (the formula would round), w > 1 sharpens towards the class."""
    if w == 1:
        return cond_logits
    if w == 0:
        return uncond_logits
    return uncond_logits + w * (cond_logits - uncond_logits)


def _twice(x: torch.Tensor, both: bool) -> torch.Tensor:
    """The batch stacked on itself when a guided step runs the conditional and null-class passes together."""
    return torch.cat([x, x]) if both else x


def _codebook_embedding(codebook: torch.Tensor, width: int, std: float) -> torch.Tensor:
    """Map a (K, D) codebook to (K, width) embeddings that keep its geometry, scaled to ``std``."""
    cb = codebook.float()
    cb = cb - cb.mean(0)
    d = cb.shape[1]
    if d != width:  # a fixed random projection roughly preserves distances between codes
        g = torch.Generator().manual_seed(0)
        cb = cb @ (torch.randn(d, width, generator=g) / math.sqrt(width))
    return cb * (std / cb.std().clamp_min(1e-8))


class Prior(nn.Module):
    """What every prior shares: building from a config, the null class and guidance, the training loss.

    Adding a kind: subclass this, implement ``from_config`` (and ``check_config`` where the kind has
    options of its own), ``forward``, ``sample``, ``init_from_codebook``, and add one line to PRIOR_KINDS.
    """

    num_classes: int = 0
    cond_dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg: PriorConfig, num_codes: int, grid: tuple[int, int]) -> Prior:
        raise NotImplementedError

    @staticmethod
    def check_config(cfg: PriorConfig) -> None:
        """Raise ConfigError for options this kind cannot use."""

    def check_cond(self, cond: torch.Tensor | None, n: int) -> None:
        _check_cond(cond, n, self.num_classes)

    def _drop_cond(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """In training, each grid's class becomes the null class with probability ``cond_dropout``: that
        teaches the unconditional model that guidance needs. Drawn on the CPU from the global RNG."""
        if cond is None or not self.training or self.cond_dropout == 0:
            return cond
        drop = torch.rand(cond.shape[0]) < self.cond_dropout
        return cond.masked_fill(drop.to(cond.device), self.num_classes)

    def _guided_cond(self, cond: torch.Tensor | None, n: int, guidance: float
                     ) -> tuple[torch.Tensor | None, bool]:
        """The classes to run the network with while sampling, and whether the batch is doubled
        (conditional half first, null-class half second). Only the passes ``guidance`` needs run."""
        self.check_cond(cond, n)
        if cond is None:
            if guidance != 1:
                raise ValueError("guidance needs a conditional prior")
            return None, False
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        if guidance == 1:
            return cond, False
        null = torch.full_like(cond, self.num_classes)
        return (null, False) if guidance == 0 else (torch.cat([cond, null]), True)

    @staticmethod
    def _mix(logits: torch.Tensor, n: int, guidance: float, both: bool) -> torch.Tensor:
        return guided_logits(logits[:n], logits[n:], guidance) if both else logits

    def loss(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy (nats) of every code given the codes before it."""
        return F.cross_entropy(self(indices, cond).float(), indices)


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
    def __init__(self, ch: int, kernel: int, mask_type: str, num_classes: int, dropout: float,
                 reads_image: bool = False):
        super().__init__()
        self.k, self.mask_a = kernel // 2, mask_type == "A"
        self.v = nn.Conv2d(ch, 2 * ch, (self.k + 1, kernel))
        self.h = nn.Conv2d(ch, 2 * ch, (1, self.k + 1))
        self.v_to_h = nn.Conv2d(2 * ch, 2 * ch, 1)
        self.h_out = nn.Conv2d(ch, ch, 1)
        self.cond = LevelEmbedding(num_classes + 1, 4 * ch) if num_classes else None  # + the null class
        # a condition map (N, ch, h, w) known everywhere at once (the coarse image's features): its own bias
        # for every position, as the conditional PixelCNN's location-dependent h
        self.image = nn.Conv2d(ch, 4 * ch, 1) if reads_image else None
        self.drop = nn.Dropout(dropout)

    @staticmethod
    def _gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None,
                features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k
        vf = self.v(F.pad(v, (k, k, k, 0)))  # rows r-k..r, columns c-k..c+k
        hf = self.h(F.pad(h, (k, 0, 0, 0)))  # row r, columns c-k..c
        if self.mask_a:
            hf = _shift_right(hf)  # columns c-k-1..c-1: never the position itself
        hf = hf + self.v_to_h(_shift_down(vf))  # rows strictly above
        if self.cond is not None:
            cv, ch = self.cond(cond)[:, :, None, None].chunk(2, dim=1)
            vf, hf = vf + cv, hf + ch
        if self.image is not None:
            cv, ch = self.image(features).chunk(2, dim=1)
            vf, hf = vf + cv, hf + ch
        h_new = self.h_out(self.drop(self._gate(hf)))
        return self._gate(vf), (h_new if self.mask_a else h + h_new)


class GatedPixelCNN(Prior):
    def __init__(self, num_codes: int, width: int = 128, layers: int = 8, kernel: int = 5,
                 num_classes: int = 0, dropout: float = 0.0, cond_dropout: float = 0.1, reads_image: bool = False):
        super().__init__()
        self.num_codes, self.num_classes, self.cond_dropout = num_codes, num_classes, cond_dropout
        self.embed = nn.Embedding(num_codes, width)
        self.blocks = nn.ModuleList(
            GatedBlock(width, kernel, "A" if i == 0 else "B", num_classes, dropout, reads_image)
            for i in range(layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, num_codes, 1))

    @classmethod
    def from_config(cls, cfg: PriorConfig, num_codes: int, grid: tuple[int, int]) -> GatedPixelCNN:
        return cls(num_codes, cfg.width, cfg.layers, cfg.kernel, cfg.num_classes, cfg.dropout, cfg.cond_dropout)

    @staticmethod
    def check_config(cfg: PriorConfig) -> None:
        if cfg.kernel < 3 or cfg.kernel % 2 == 0:
            raise ConfigError(f"prior.kernel must be an odd number >= 3, got {cfg.kernel}")

    def init_from_codebook(self, codebook: torch.Tensor) -> None:
        with torch.no_grad():
            self.embed.weight.copy_(_codebook_embedding(codebook, self.embed.embedding_dim, 1.0))

    def _split_cond(self, cond: torch.Tensor | None, h: int, w: int
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``cond`` -> (level classes, condition map (N, width, h, w)); a plain PixelCNN has no map."""
        return cond, None

    def forward_embedded(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                         features: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded grid (N, width, h, w) -> logits (N, K, h, w)."""
        v = h = x
        for block in self.blocks:
            v, h = block(v, h, cond, features)
        return self.head(h)

    def forward(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        n, h, w = indices.shape
        self.check_cond(cond, n)
        classes, features = self._split_cond(self._drop_cond(cond), h, w)
        return self.forward_embedded(self.embed(indices).permute(0, 3, 1, 2), classes, features)

    @torch.no_grad()
    def sample(self, n: int, grid_hw: tuple[int, int], temperature: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None, cond: torch.Tensor | None = None,
               guidance: float = 1.0) -> torch.Tensor:
        h, w = grid_hw
        dev = self.embed.weight.device
        conds, both = self._guided_cond(cond, n, guidance)
        classes, features = self._split_cond(conds, h, w)
        out = torch.zeros(n, h, w, dtype=torch.long, device=dev)
        # Position (r, c) depends only on rows r - reach .. r and columns c - reach .. c + reach (the
        # receptive field; wrong values at a window's edge travel one kernel radius per block, so they
        # stop short of (r, c)), so only that window is computed.
        reach = sum(b.k for b in self.blocks) + 1
        for r in range(h):
            top = max(0, r - reach)
            for c in range(w):
                left, right = max(0, c - reach), min(w, c + reach + 1)
                x = self.embed(_twice(out[:, top:r + 1, left:right], both)).permute(0, 3, 1, 2)
                window = None if features is None else features[:, :, top:r + 1, left:right]
                logits = self.forward_embedded(x, classes, window)[:, :, -1, c - left]
                out[:, r, c] = _draw(self._mix(logits, n, guidance, both), temperature, top_k, generator)
        return out


# --------------------------------------------------------------------------------------------------
# Decoder-only transformer over the raster sequence (nanoGPT style, pre-LN) with a KV cache.
# Input at step t is the code of position t-1 (a learned start token at t = 0) plus the row and column
# embeddings of position t, so every position, including the first, is predicted.
# The same blocks, non-causal, make the MaskGIT below.
# --------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with an optional KV cache. No dropout on the attention weights: with it,
    CPU attention falls back to a slow path (measured 5x per step); the block drops its residual branch."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cache_len = 0

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, 2))
        if use_cache:  # append this step's keys/values and attend to everything cached so far
            if not self.causal:
                raise ValueError("the KV cache is for causal attention only")
            ck, cv = self.cache
            ck[:, :, self.cache_len:self.cache_len + t] = k
            cv[:, :, self.cache_len:self.cache_len + t] = v
            self.cache_len += t
            k, v = ck[:, :, :self.cache_len], cv[:, :, :self.cache_len]
            causal = t > 1  # with t == 1 the single query may see every cached key
            if causal and self.cache_len != t:
                raise ValueError("multi-token cached steps are only supported from an empty cache")
        else:
            causal = self.causal
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, causal: bool = True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), use_cache))
        return x + self.mlp(self.ln2(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def _gpt_init(model: nn.Module, layers: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections scaled down by depth."""
    model.apply(_init_weights)
    for name, p in model.named_parameters():
        if name.endswith(("proj.weight", "mlp.2.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))


class TransformerPrior(Prior):
    def __init__(self, num_codes: int, grid: tuple[int, int], width: int = 128, layers: int = 4,
                 heads: int = 4, num_classes: int = 0, dropout: float = 0.0, cond_dropout: float = 0.1):
        super().__init__()
        self.num_codes, self.num_classes, self.grid = num_codes, num_classes, tuple(grid)
        self.cond_dropout = cond_dropout
        self.tok = nn.Embedding(num_codes, width)
        self.start = nn.Parameter(torch.zeros(width))
        self.row = nn.Embedding(grid[0], width)
        self.col = nn.Embedding(grid[1], width)
        self.cls = LevelEmbedding(num_classes + 1, width) if num_classes else None  # + the null class
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_codes, bias=False)
        _gpt_init(self, layers)

    @classmethod
    def from_config(cls, cfg: PriorConfig, num_codes: int, grid: tuple[int, int]) -> TransformerPrior:
        return cls(num_codes, grid, cfg.width, cfg.layers, cfg.heads, cfg.num_classes, cfg.dropout,
                   cfg.cond_dropout)

    check_config = staticmethod(_check_heads)

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
        cond = self._drop_cond(cond)
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
               guidance: float = 1.0, use_cache: bool = True) -> torch.Tensor:
        h, w = grid_hw
        conds, both = self._guided_cond(cond, n, guidance)
        b = 2 * n if both else n  # a guided batch holds each grid twice, so the cache does too
        out = torch.zeros(n, h * w, dtype=torch.long, device=self.start.device)
        if use_cache:
            self._reset_cache(b, h * w)
        try:
            for t in range(h * w):
                if use_cache:
                    x = self._inputs(None if t == 0 else _twice(out[:, t - 1:t], both), b, conds)
                    logits = self._run(x + self._pos(h, w, t, 1), use_cache=True)[:, -1]
                else:
                    x = self._inputs(None, b, conds)
                    if t:
                        x = torch.cat([x, self._inputs(_twice(out[:, :t], both), b, conds)], dim=1)
                    logits = self._run(x + self._pos(h, w, 0, t + 1))[:, -1]
                out[:, t] = _draw(self._mix(logits, n, guidance, both), temperature, top_k, generator)
        finally:
            self._clear_cache()
        return out.view(n, h, w)


# --------------------------------------------------------------------------------------------------
# MaskGIT (Chang et al. 2022): a bidirectional transformer trained to fill in randomly masked codes, a
# cosine share of them per grid. Sampling starts from an all-[MASK] grid and in each of a few passes
# samples every masked code, keeps the most confident and masks the rest again, fewer each pass.
# --------------------------------------------------------------------------------------------------


def mask_ratio(t: float | torch.Tensor) -> float | torch.Tensor:
    """Cosine schedule: the share of codes masked at decoding progress ``t`` in [0, 1] (1 at 0, 0 at 1).
    Written as sin(pi/2 (1 - t)), which is cos(pi/2 t) with both ends exact."""
    if isinstance(t, torch.Tensor):
        return torch.sin(math.pi / 2 * (1 - t))
    return math.sin(math.pi / 2 * (1 - t))


def masked_count(step: int, steps: int, length: int) -> int:
    """Codes still masked after pass ``step`` of ``steps`` over ``length`` codes: the floored cosine
    schedule, but at least one fewer per pass so that no pass is wasted (needs steps <= length)."""
    if not 0 <= step <= steps:
        raise ValueError(f"step must be in [0, {steps}], got {step}")
    return max(0, min(math.floor(length * mask_ratio(step / steps)), length - step))


class MaskedPrior(Prior):
    """What the masked-code priors share: the loss on masked codes and confidence-ordered parallel decoding.
    A subclass builds ``tok`` (its last row is [MASK], ``mask_id``) and ``_run(seq, h, w, cond) -> logits
    (N, h*w, K)``."""

    mask_id: int
    decode_steps: int = 12

    def _run(self, seq: torch.Tensor, h: int, w: int, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        n, h, w = indices.shape
        self.check_cond(cond, n)
        logits = self._run(indices.reshape(n, h * w), h, w, self._drop_cond(cond))
        return logits.transpose(1, 2).reshape(n, self.num_codes, h, w)

    def loss(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy (nats) of the masked codes given the rest: per grid a share
        mask_ratio(u), u ~ U(0, 1), of the positions (at least one), chosen uniformly, is masked."""
        return self.losses(indices, cond)["masked"]

    def losses(self, indices: torch.Tensor, cond: torch.Tensor | None = None, unrolled: bool = False
               ) -> dict[str, torch.Tensor]:
        """``masked``: the loss above; with ``unrolled`` also ``unrolled``, step-unrolled denoising (SUNDAE,
        Savinov et al. 2022): the masked codes are filled by a draw from the same pass's logits (no gradient)
        and the prior predicts the real code at every position of that grid. Sampling reads the prior's own
        draws, which disagree in ways real codes never do; this term trains it on them. ``loss`` is the sum."""
        n, h, w = indices.shape
        self.check_cond(cond, n)
        length = h * w
        count = (mask_ratio(torch.rand(n)) * length).ceil().clamp(1, length)
        rank = torch.rand(n, length).argsort(1).argsort(1)  # a uniform random order of each grid's positions
        masked = (rank < count[:, None]).to(indices.device)
        seq, cond = indices.reshape(n, length), self._drop_cond(cond)
        logits = self._run(seq.masked_fill(masked, self.mask_id), h, w, cond)
        out = {"masked": F.cross_entropy(logits[masked].float(), seq[masked])}
        if unrolled:
            drawn = seq.masked_scatter(masked, _inverse_cdf(logits[masked].detach().float(), None))
            again = self._run(drawn, h, w, cond)
            out["unrolled"] = F.cross_entropy(again.reshape(-1, self.num_codes).float(), seq.reshape(-1))
        out["loss"] = sum(out.values())
        return out

    @torch.no_grad()
    def sample(self, n: int, grid_hw: tuple[int, int], temperature: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None, cond: torch.Tensor | None = None,
               guidance: float = 1.0, steps: int | None = None, choice_temperature: float = 4.5,
               given: torch.Tensor | None = None) -> torch.Tensor:
        """Parallel decoding in ``steps`` passes (default ``decode_steps``, at most the codes to draw). Each
        pass samples every masked code; the kept ones are the most confident by log-probability plus Gumbel
        noise scaled by ``choice_temperature``, annealed to 0 (MaskGIT's randomised top-k). ``given``
        (n, h, w) fixes codes and draws only where it holds ``mask_id`` (as many positions in every grid)."""
        h, w = grid_hw
        dev = self.tok.weight.device
        if given is None:
            seq = torch.full((n, h * w), self.mask_id, dtype=torch.long, device=dev)
        else:
            if given.shape != (n, h, w):
                raise ValueError(f"given codes of shape {tuple(given.shape)} are not ({n}, {h}, {w})")
            seq = given.reshape(n, h * w).to(dev, torch.long, copy=True)
        to_draw = (seq == self.mask_id).sum(1)
        if not torch.all(to_draw == to_draw[0]):
            raise ValueError("given codes must leave as many positions to draw in every grid")
        length = int(to_draw[0])  # the schedule runs over the codes to draw
        if length == 0:
            return seq.view(n, h, w)
        steps = min(self.decode_steps if steps is None else steps, length)
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        conds, both = self._guided_cond(cond, n, guidance)
        for s in range(steps):
            masked = seq == self.mask_id
            logits = self._mix(self._run(_twice(seq, both), h, w, conds), n, guidance, both)
            logits = _filter_logits(logits[masked], temperature, top_k)  # (masked codes, K), grid by grid
            codes = _inverse_cdf(logits, generator)
            seq[masked] = codes
            keep_masked = masked_count(s + 1, steps, length)  # the same for every grid
            if keep_masked == 0:
                break  # the last pass: every code is filled
            conf = torch.full((n, h * w), math.inf, device=dev)  # codes fixed earlier are never re-masked
            gumbel = -torch.log(-torch.log(torch.rand(n, h * w, generator=generator, device=dev)))
            log_p = torch.log_softmax(logits, -1).gather(1, codes[:, None]).squeeze(1)
            conf[masked] = log_p + choice_temperature * (1 - (s + 1) / steps) * gumbel[masked]
            seq.scatter_(1, conf.topk(keep_masked, dim=1, largest=False).indices, self.mask_id)
        return seq.view(n, h, w)


class MaskGITPrior(MaskedPrior):
    """With ``group`` g > 1 one attention token holds a g x g block of codes: its embedding is a linear map
    of the g*g code embeddings (each may be [MASK]) and it predicts all g*g codes. Attention costs as on a
    grid g times smaller per side, while masking and decoding still work code by code."""

    def __init__(self, num_codes: int, grid: tuple[int, int], width: int = 128, layers: int = 4,
                 heads: int = 4, num_classes: int = 0, dropout: float = 0.0, cond_dropout: float = 0.1,
                 decode_steps: int = 12, group: int = 1):
        super().__init__()
        if grid[0] % group or grid[1] % group:
            raise ConfigError(f"a {grid[0]}x{grid[1]} code grid does not split into {group}x{group} groups")
        self.num_codes, self.num_classes, self.grid = num_codes, num_classes, tuple(grid)
        self.cond_dropout, self.decode_steps, self.group = cond_dropout, decode_steps, group
        self.mask_id = num_codes
        self.tok = nn.Embedding(num_codes + 1, width)  # + [MASK]
        self.merge = nn.Linear(group * group * width, width) if group > 1 else None
        self.row = nn.Embedding(grid[0] // group, width)
        self.col = nn.Embedding(grid[1] // group, width)
        self.cls = LevelEmbedding(num_classes + 1, width) if num_classes else None  # + the null class
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, group * group * num_codes)  # real codes only: [MASK] is never a prediction
        _gpt_init(self, layers)

    @classmethod
    def from_config(cls, cfg: PriorConfig, num_codes: int, grid: tuple[int, int]) -> MaskGITPrior:
        return cls(num_codes, grid, cfg.width, cfg.layers, cfg.heads, cfg.num_classes, cfg.dropout,
                   cfg.cond_dropout, cfg.decode_steps, cfg.group)

    check_config = staticmethod(_check_heads)

    def init_from_codebook(self, codebook: torch.Tensor) -> None:
        with torch.no_grad():
            self.tok.weight[:self.num_codes] = _codebook_embedding(codebook, self.tok.embedding_dim, 0.02)

    def _tokens(self, seq: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Codes ``seq`` (N, h*w) in raster order, [MASK] allowed -> token embeddings with their positions
        (N, h*w / group**2, width)."""
        g = self.group
        if h > self.grid[0] or w > self.grid[1] or h % g or w % g:
            raise ValueError(f"grid {h}x{w} is not within the prior's {self.grid[0]}x{self.grid[1]} "
                             f"in {g}x{g} groups")
        n, th, tw = seq.shape[0], h // g, w // g
        x = self.tok(seq)
        if g > 1:  # (N, th, g, tw, g, width) -> one token per group, its codes in raster order
            x = self.merge(x.view(n, th, g, tw, g, -1).permute(0, 1, 3, 2, 4, 5).reshape(n, th * tw, -1))
        return x + (self.row.weight[:th, None] + self.col.weight[None, :tw]).reshape(th * tw, -1)

    def _logits(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Token embeddings (N, T, width) through the transformer -> logits (N, h*w, K), codes in raster order."""
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        g = self.group
        if g > 1:  # back to one row of logits per code, in raster order over the whole grid
            logits = logits.view(-1, h // g, w // g, g, g, self.num_codes).permute(0, 1, 3, 2, 4, 5)
        return logits.reshape(-1, h * w, self.num_codes)

    def _run(self, seq: torch.Tensor, h: int, w: int, cond: torch.Tensor | None) -> torch.Tensor:
        """Codes ``seq`` (N, h*w) in raster order, [MASK] allowed -> logits (N, h*w, K)."""
        x = self._tokens(seq, h, w)
        if self.cls is not None:
            x = x + self.cls(cond)[:, None, :]
        return self._logits(x, h, w)


# --------------------------------------------------------------------------------------------------
# Upsampler: the fine codes of one run given a coarser run's reconstruction of the same slice (a
# two-level code as in VQ-VAE-2, Razavi et al. 2019, with the levels in two tokenisers). The coarse
# prior draws the head's layout on its small grid, the coarse decoder turns it into a blurred image, and
# this prior fills in the fine codes that sharpen it. It reads the blurred image, not the coarse code
# ids: an image says directly how bright each fine code's patch is, where a code id is a label whose
# meaning a small network must first learn (measured: with the ids, even real coarse codes gave mottled,
# over-bright fine codes after 840 steps). What is left is mostly local, so the network is convolutional
# (residual blocks of 3x3 convolutions, far cheaper per step than attention over every fine code) and
# decodes like MaskGIT.
# --------------------------------------------------------------------------------------------------


class _ResBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                   nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(width, width, 1))
        nn.init.zeros_(self.block[-1].weight)  # starts as the identity
        nn.init.zeros_(self.block[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class _ReadsCoarseImage:
    """The upsamplers' condition: the coarse run's reconstruction of the same slices, (N, 1, H, W) with
    H = ``patch`` x the grid's height: uint8, or float in [0, 1]. Not a class; never dropped, so no guidance."""

    patch: int

    def check_cond(self, cond: torch.Tensor | None, n: int) -> None:
        if cond is None or cond.dim() != 4 or cond.shape[:2] != (n, 1):
            raise ValueError(f"the upsampler prior takes the coarse run's images (N={n}, 1, H, W) as cond")

    def _guided_cond(self, cond: torch.Tensor | None, n: int, guidance: float
                     ) -> tuple[torch.Tensor | None, bool]:
        self.check_cond(cond, n)
        if guidance != 1:
            raise ValueError("the upsampler prior has no guidance (its condition is never dropped)")
        return cond, False

    def _pixels(self, cond: torch.Tensor, h: int, w: int, cell: int) -> torch.Tensor:
        """The coarse images as (N, cell**2, h*patch/cell, w*patch/cell) floats in [0, 1]: each position holds
        the cell x cell pixels it covers."""
        if cond.shape[-2:] != (h * self.patch, w * self.patch):
            raise ValueError(f"coarse images of {tuple(cond.shape[-2:])} pixels do not cover a {h}x{w} grid of "
                             f"{self.patch}x{self.patch}-pixel codes")
        img = cond.float() / 255 if cond.dtype == torch.uint8 else cond.float()
        return F.pixel_unshuffle(img, cell)


class UpsamplerPrior(_ReadsCoarseImage, MaskedPrior):
    """MaskGIT decoding over a fine code grid, convolutional, reading the coarse run's image (see
    _ReadsCoarseImage). With ``group`` > 1 in its config it is built as an AttentionUpsamplerPrior."""

    def __init__(self, num_codes: int, patch: int, width: int = 128, layers: int = 6,
                 dropout: float = 0.0, decode_steps: int = 12):
        super().__init__()
        self.num_codes, self.patch, self.num_classes = num_codes, patch, 0
        self.cond_dropout, self.decode_steps, self.mask_id = 0.0, decode_steps, num_codes
        self.tok = nn.Embedding(num_codes + 1, width)  # + [MASK]
        # each fine code reads the patch x patch pixels it covers and those of its neighbours
        self.image = nn.Conv2d(patch * patch, width, 3, padding=1)
        # undilated: six blocks see 7 codes (28 pixels) either way; dilations 1-2-4-8-1-2 saw 18 but drew a
        # mottle where these draw sulcus-like lines at the same cost (docs/generation_log.md "Undilated
        # blocks": format 4)
        self.blocks = nn.Sequential(*(_ResBlock(width, dropout) for _ in range(layers)))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(width, num_codes, 1))

    @classmethod
    def from_config(cls, cfg: PriorConfig, num_codes: int, grid: tuple[int, int]) -> Prior:
        if cfg.autoregressive:
            return PixelCNNUpsamplerPrior(num_codes, cfg.patch, cfg.width, cfg.layers, cfg.kernel, cfg.dropout)
        if cfg.group > 1:
            return AttentionUpsamplerPrior(num_codes, grid, cfg.patch, cfg.width, cfg.layers, cfg.heads,
                                           cfg.dropout, cfg.decode_steps, cfg.group)
        return cls(num_codes, cfg.patch, cfg.width, cfg.layers, cfg.dropout, cfg.decode_steps)

    @staticmethod
    def check_config(cfg: PriorConfig) -> None:
        if not cfg.coarse_run:
            raise ConfigError("the upsampler prior needs the coarse run whose reconstructions condition it (coarse_run)")
        if cfg.patch <= 0 or cfg.num_classes:
            raise ConfigError("the upsampler prior needs prior.patch > 0 (pixels per code) and no level classes "
                              "(the coarse image carries the level)")
        if cfg.autoregressive:
            if cfg.group > 1:
                raise ConfigError("an autoregressive upsampler draws code by code: it takes no prior.group")
            GatedPixelCNN.check_config(cfg)
        elif cfg.group > 1:
            _check_heads(cfg)

    def init_from_codebook(self, codebook: torch.Tensor) -> None:
        with torch.no_grad():
            self.tok.weight[:self.num_codes] = _codebook_embedding(codebook, self.tok.embedding_dim, 1.0)

    def _run(self, seq: torch.Tensor, h: int, w: int, cond: torch.Tensor | None) -> torch.Tensor:
        """Fine codes ``seq`` (N, h*w), [MASK] allowed, and coarse images ``cond`` -> logits (N, h*w, K)."""
        n = seq.shape[0]
        x = self.tok(seq).view(n, h, w, -1).permute(0, 3, 1, 2)
        x = x + self.image(self._pixels(cond, h, w, self.patch))
        return self.head(self.blocks(x)).flatten(2).transpose(1, 2)


class AttentionUpsamplerPrior(_ReadsCoarseImage, MaskGITPrior):
    """The upsampler as a MaskGIT over tokens of ``group`` x ``group`` fine codes, each token also reading
    the coarse image's pixels under it: every code sees the whole grid, where the convolutional upsampler
    sees a few codes around it (which drew no gyri at 32x32; docs/generation_log.md, "A 32x32 level
    between")."""

    def __init__(self, num_codes: int, grid: tuple[int, int], patch: int, width: int = 128, layers: int = 4,
                 heads: int = 4, dropout: float = 0.0, decode_steps: int = 12, group: int = 2):
        super().__init__(num_codes, grid, width, layers, heads, 0, dropout, 0.0, decode_steps, group)
        self.patch = patch
        self.image = nn.Linear((patch * group) ** 2, width)

    def _run(self, seq: torch.Tensor, h: int, w: int, cond: torch.Tensor | None) -> torch.Tensor:
        pixels = self._pixels(cond, h, w, self.patch * self.group).flatten(2).transpose(1, 2)
        return self._logits(self._tokens(seq, h, w) + self.image(pixels), h, w)


class PixelCNNUpsamplerPrior(_ReadsCoarseImage, GatedPixelCNN):
    """The upsampler drawing code by code in raster order, a gated PixelCNN whose every block also reads
    features of the whole coarse image (VQ-VAE-2's bottom prior, with the coarse level as an image). Each
    code is drawn given all codes before it, where the masked upsamplers draw many at once from
    conditionals that leave several likely choices each; the price is one network pass per code."""

    def __init__(self, num_codes: int, patch: int, width: int = 64, layers: int = 6, kernel: int = 5,
                 dropout: float = 0.0):
        super().__init__(num_codes, width, layers, kernel, 0, dropout, 0.0, reads_image=True)
        self.patch = patch
        # each code's features read the pixels it covers and, through the blocks, 3 codes either way
        self.image = nn.Sequential(nn.Conv2d(patch * patch, width, 3, padding=1),
                                   _ResBlock(width, dropout), _ResBlock(width, dropout))

    def _split_cond(self, cond: torch.Tensor | None, h: int, w: int
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, self.image(self._pixels(cond, h, w, self.patch))


# Every prior kind by name; a new kind is its class and one line here.
PRIOR_KINDS: dict[str, type[Prior]] = {
    "transformer": TransformerPrior,
    "pixelcnn": GatedPixelCNN,
    "maskgit": MaskGITPrior,
    "upsampler": UpsamplerPrior,
}


def build_prior(cfg: PriorConfig, num_codes: int, grid: tuple[int, int]) -> Prior:
    """A prior for ``num_codes`` codes on an ``grid`` = (h, w) code grid, as ``cfg`` describes."""
    cfg.validate()
    return PRIOR_KINDS[cfg.kind].from_config(cfg, num_codes, tuple(grid))
