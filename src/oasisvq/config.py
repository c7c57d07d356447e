"""Typed run configuration, saved as ``config.json`` beside every run.

A run is reproducible from this file and its seed. Only plain values live here (no class paths, nothing
that instantiates objects), so a config read from disk can never run code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_VERSION = 1


@dataclass
class DataConfig:
    """Where slices come from and how they are preprocessed."""

    paths: list[str] = field(default_factory=list)
    size: int = 256  # slices are padded/resized to size x size
    axis: str = "axial"  # volumes only: axial | coronal | sagittal
    min_foreground: float = 0.05  # volumes only: keep slices with at least this fraction of head pixels
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # sources without their own splits
    image_pattern: str = ""  # volumes only: glob on file names, e.g. "*masked_gfc*"
    seed: int = 0  # subject split seed

    def validate(self) -> None:
        if self.size <= 0 or self.size % 16:
            raise ConfigError(f"data.size must be a positive multiple of 16, got {self.size}")
        if self.axis not in ("axial", "coronal", "sagittal"):
            raise ConfigError(f"data.axis must be axial, coronal or sagittal, got {self.axis!r}")
        if not 0 <= self.min_foreground < 1:
            raise ConfigError(f"data.min_foreground must be in [0, 1), got {self.min_foreground}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) < 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise ConfigError(f"data.split_fractions must be three non-negative numbers summing to 1, got {fr}")


@dataclass
class ModelConfig:
    """VQ-VAE shape. ``downsample`` is the ratio image size / code grid size."""

    downsample: int = 4  # 4, 8 or 16
    channels: tuple[int, ...] = (32, 64)  # encoder width after each stride-2 stage (len = log2(downsample))
    hidden: int = 128  # width of the residual blocks at the code grid
    res_blocks: int = 2
    num_codes: int = 512
    code_dim: int = 32
    decay: float = 0.99  # EMA decay of the codebook
    beta: float = 0.25  # commitment weight
    cosine: bool = False  # l2-normalised codes and encodings
    dead_code_steps: int = 10  # a code unused for this many steps is re-seeded from recent encodings
    recon_loss: str = "l1"  # l1 | mse
    ssim_weight: float = 0.1  # weight of (1 - SSIM) added to the reconstruction loss

    @property
    def stages(self) -> int:
        return round(math.log2(self.downsample))

    def validate(self, image_size: int | None = None) -> None:
        if self.downsample not in (2, 4, 8, 16):
            raise ConfigError(f"model.downsample must be 2, 4, 8 or 16, got {self.downsample}")
        if len(self.channels) != self.stages:
            raise ConfigError(
                f"model.channels needs one width per stride-2 stage ({self.stages} for downsample "
                f"{self.downsample}), got {list(self.channels)}"
            )
        for name in ("hidden", "num_codes", "code_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if min(self.channels) <= 0 or self.res_blocks < 0:
            raise ConfigError("model.channels must be positive and model.res_blocks non-negative")
        if not 0 < self.decay < 1:
            raise ConfigError(f"model.decay must be in (0, 1), got {self.decay}")
        if self.recon_loss not in ("l1", "mse"):
            raise ConfigError(f"model.recon_loss must be l1 or mse, got {self.recon_loss!r}")
        if image_size is not None and image_size % self.downsample:
            raise ConfigError(
                f"model.downsample {self.downsample} does not divide the image size {image_size}"
            )


@dataclass
class TrainConfig:
    epochs: int = 10
    max_minutes: float = 0.0  # > 0: stop after this much wall-clock training time
    # > 0: stop after this many optimizer steps; unlike minutes, the same on any machine, so a run (or a
    # benchmark row) repeats on a slower day with the steps a faster one made
    max_steps: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on CPU
    seed: int = 0
    val_slices: int = 256  # at most this many validation slices per evaluation (fixed subset)
    evals_per_epoch: int = 1
    augment: bool = False  # random flips / small intensity jitter of training slices
    compile: str = "auto"  # torch.compile the model: on | off | auto (runs of >= 1 min or >= 100 steps, 1 process)

    def validate(self) -> None:
        if self.epochs <= 0 and self.max_minutes <= 0 and self.max_steps <= 0:
            raise ConfigError("train.epochs, train.max_minutes or train.max_steps must be positive")
        if self.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {self.max_steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"train.batch_size must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.evals_per_epoch <= 0:
            raise ConfigError("train.evals_per_epoch must be positive")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"train.compile must be auto, on or off, got {self.compile!r}")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    version: int = CONFIG_VERSION

    def validate(self) -> RunConfig:
        self.data.validate()
        self.model.validate(self.data.size)
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        version = d.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config version {version} is not supported (this oasisvq reads {CONFIG_VERSION})")
        return cls(
            data=_build(DataConfig, d.get("data", {}), "data"),
            model=_build(ModelConfig, d.get("model", {}), "model"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )

    def save(self, path: Path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a JSON config ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a config must be a JSON object")
        return cls.from_dict(d)


def _build(kind: type, values: dict[str, Any], section: str):
    """Build one config section, refusing unknown keys and values of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be an object")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in config section {section!r}: {', '.join(unknown)}")
    out = kind()
    for name, value in values.items():
        default = getattr(out, name)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{section}.{name} must be a list, got {value!r}")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{section}.{name} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{section}.{name} must be a number, got {value!r}")
            if isinstance(default, int) and not float(value).is_integer():
                raise ConfigError(f"{section}.{name} must be an integer, got {value!r}")
            value = type(default)(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{section}.{name} must be a string, got {value!r}")
        elif isinstance(default, list) and not isinstance(value, list):
            raise ConfigError(f"{section}.{name} must be a list, got {value!r}")
        setattr(out, name, value)
    return out


# Named model presets: the CPU one is sized for a 2-core laptop, the GPU one for quality.
PRESETS: dict[str, dict[str, Any]] = {
    # cpu: SSIM weight 0.5, not 0.1: held-out SSIM, in-head SSIM and PSNR all higher at 30 minutes (README,
    # Reconstruction). cpu-f16 keeps 0.1: at 0.5 the demo's 16x16 tokeniser never left its first state.
    "cpu": {"downsample": 4, "channels": (16, 32), "hidden": 96, "res_blocks": 2, "num_codes": 512, "code_dim": 32,
            "ssim_weight": 0.5},
    "cpu-f8": {"downsample": 8, "channels": (32, 64, 128), "hidden": 128, "res_blocks": 2,
               "num_codes": 512, "code_dim": 32},
    "cpu-f16": {"downsample": 16, "channels": (16, 32, 64, 128), "hidden": 128, "res_blocks": 2,
                "num_codes": 512, "code_dim": 32},
    "gpu": {"downsample": 4, "channels": (64, 128), "hidden": 256, "res_blocks": 4, "num_codes": 1024,
            "code_dim": 64},
    "gpu-f8": {"downsample": 8, "channels": (64, 128, 256), "hidden": 256, "res_blocks": 4,
               "num_codes": 1024, "code_dim": 64},
}


def model_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(ModelConfig(), **PRESETS[name])
