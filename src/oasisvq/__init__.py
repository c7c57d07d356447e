"""oasisvq: learn brain MRI with a VQ-VAE, generate new slices from a prior over its codes."""

__version__ = "0.1.0"
