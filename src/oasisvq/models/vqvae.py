"""Convolutional VQ-VAE for single-channel MRI slices.

Cheap layers at full resolution (one stride-2 conv in, one transposed conv out) and the heavy residual
work at the code grid: that is what makes it train fast on a CPU.

Public API: ``encode(x) -> indices``, ``decode_indices(indices) -> image``, ``forward(x) -> (recon, losses)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..metrics import ssim
from .quantizer import VectorQuantizer


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        prev = 1
        for ch in cfg.channels:  # each stage halves the resolution
            layers += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), nn.ReLU()]
            prev = ch
        layers.append(nn.Conv2d(prev, cfg.hidden, 3, padding=1))
        layers += [ResBlock(cfg.hidden) for _ in range(cfg.res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, cfg.hidden, 3, padding=1)]
        layers += [ResBlock(cfg.hidden) for _ in range(cfg.res_blocks)]
        layers.append(nn.ReLU())
        prev = cfg.hidden
        for ch in reversed(cfg.channels):
            layers += [nn.ConvTranspose2d(prev, ch, 4, stride=2, padding=1), nn.ReLU()]
            prev = ch
        layers.append(nn.Conv2d(prev, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _init_weights(module: nn.Module) -> None:
    """He initialisation for the ReLU stack, and residual blocks that start as the identity.

    PyTorch's default conv init shrinks the signal's variance several-fold per layer: through the 16x
    encoder's nine layers its output was about 1e-3 of its input's spread, every slice encoded alike, and
    the decoder settled on the mean image (on the demo's template it stayed there for hundreds of steps)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.ConvTranspose2d):
        # each output pixel of a stride-s transposed conv sums in_channels * k^2 / s^2 weighted inputs
        fan_in = module.in_channels * math.prod(module.kernel_size) / math.prod(module.stride)
        nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_in))
        nn.init.zeros_(module.bias)
    if isinstance(module, ResBlock):  # Module.apply visits children first: this overrides the He init above
        nn.init.zeros_(module.block[-1].weight)


class VQVAE(nn.Module):
    """Encoder -> vector quantiser -> decoder, configured by a :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.decay, cfg.beta, cfg.cosine,
                                         cfg.dead_code_steps)
        self.decoder = Decoder(cfg)
        self.apply(_init_weights)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"VQVAE expects (N, 1, H, W) images, got {tuple(x.shape)}")
        f = self.cfg.downsample
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor {f}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 1, H, W) in [0, 1] -> code indices (N, H/f, W/f)."""
        self._check(x)
        z = self.encoder(x)
        n, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self.quantizer._prepare(z.float().permute(0, 2, 3, 1).reshape(-1, d))
            return self.quantizer.assign(flat).view(n, h, w)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (N, h, w) -> images (N, 1, h*f, w*f), clamped to [0, 1]."""
        if indices.dim() != 3:
            raise ValueError(f"decode_indices expects (N, h, w) indices, got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.cfg.num_codes):
            raise ValueError(f"code indices must lie in [0, {self.cfg.num_codes})")
        q = self.quantizer.lookup(indices)
        return self.decoder(q.to(next(self.decoder.parameters()).dtype)).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the reconstruction and a dict of losses ("loss" is the total) and codebook stats."""
        self._check(x)
        q, _, commit, stats = self.quantizer(self.encoder(x))
        recon = self.decoder(q)
        xr, xf = recon.float(), x.float()
        rec = F.l1_loss(xr, xf) if self.cfg.recon_loss == "l1" else F.mse_loss(xr, xf)
        loss = rec + commit
        losses = {"recon": rec, "commit": commit}
        if self.cfg.ssim_weight > 0:
            s = ssim(xr.clamp(0, 1), xf).mean()
            loss = loss + self.cfg.ssim_weight * (1 - s)
            losses["ssim"] = s.detach()
        losses["loss"] = loss
        losses.update(stats)
        return recon, losses
