"""Neural networks: the VQ-VAE, its quantiser and the priors over its code grids."""

from .quantizer import VectorQuantizer
from .vqvae import VQVAE

__all__ = ["VQVAE", "VectorQuantizer"]

from .priors import GatedPixelCNN, PriorConfig, TransformerPrior, build_prior

__all__ += ["GatedPixelCNN", "PriorConfig", "TransformerPrior", "build_prior"]
