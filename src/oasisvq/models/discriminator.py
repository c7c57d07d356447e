"""A patch discriminator and the hinge adversarial loss that sharpen a VQ-VAE's decoder (as in VQGAN).

At a coarse code grid (16x16 for 256x256 slices) an L1 + SSIM decoder can only average the fine texture
it cannot encode, so gyri and sulci come out as a blur. A discriminator that judges overlapping patches
(38 px across) as real or reconstructed pushes the decoder to draw plausible texture instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Three stride-2 convolutions and a 3x3 head: one real/fake logit per 8x8 block of the input."""

    def __init__(self, width: int = 16, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        prev = 1
        for i in range(layers):
            ch = width * 2**i
            blocks.append(nn.Conv2d(prev, ch, 4, stride=2, padding=1))
            if i:  # GroupNorm, not BatchNorm: the same under DDP and for any batch size
                blocks.append(nn.GroupNorm(min(8, ch), ch))
            blocks.append(nn.LeakyReLU(0.2))
            prev = ch
        blocks.append(nn.Conv2d(prev, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminator_loss(disc: PatchDiscriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator; ``fake`` is detached, so its gradient reaches the discriminator only."""
    return F.relu(1 - disc(real)).mean() + F.relu(1 + disc(fake.detach())).mean()


def generator_loss(disc: PatchDiscriminator, fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss, through the discriminator's weights detached: its gradient reaches the
    decoder only. With :func:`discriminator_loss` added to the same total, one backward pass and one
    optimizer step train both sides without either pulling on the other."""
    frozen = {k: p.detach() for k, p in disc.named_parameters()}
    return -torch.func.functional_call(disc, frozen, (fake,)).mean()


def balance_weight(recon_loss: torch.Tensor, adv_loss: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """VQGAN's adaptive weight, measured at the reconstruction's pixels instead of the decoder's last layer
    (which a compiled model does not expose cheaply): the ratio of the two losses' gradient norms, so the
    adversarial term pulls about as hard as the reconstruction terms whatever their scales."""
    g_rec = torch.autograd.grad(recon_loss, fake, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, fake, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-6)).clamp(max=1e4).detach()
