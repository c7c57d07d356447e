"""Evaluation: reconstruction metrics of a VQ-VAE and generation metrics of sampled slices."""

from .generation import evaluate_sample_dir, evaluate_samples, read_sample_pngs
from .reconstruction import evaluate, floor_name, reconstruct

__all__ = ["evaluate", "evaluate_sample_dir", "evaluate_samples", "floor_name", "read_sample_pngs", "reconstruct"]
