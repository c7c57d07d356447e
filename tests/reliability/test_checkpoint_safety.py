"""Promise 4: an untrusted checkpoint cannot run code, and a wrong one is refused with a clear reason.

The malicious file is a real exploit: ``torch.load(weights_only=False)`` of it creates a marker file (shown
first, so the test proves something). oasisvq never unpickles, so the marker never appears.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from oasisvq.checkpoint import load_checkpoint, save_checkpoint
from oasisvq.errors import CheckpointError, ConfigError
from oasisvq.prior import load_prior
from oasisvq.tokenizer import load_model

from .conftest import SIZE, error_line, oasisvq


class Exploit:
    """Unpickling this opens (creates) ``marker``: stands in for any code an attacker wants to run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_exploit(path: Path, marker: Path) -> None:
    torch.save({"state_dict": Exploit(marker)}, path)


@pytest.fixture()
def run(tmp_path, trained_run) -> Path:
    r = tmp_path / "run"
    shutil.copytree(trained_run, r)
    return r


def test_the_exploit_is_real(tmp_path):
    probe, marker = tmp_path / "probe.pt", tmp_path / "probe-marker"
    write_exploit(probe, marker)
    assert not marker.exists()
    torch.load(probe, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


def test_pickle_checkpoint_refused_in_process(run, tmp_path):
    marker = tmp_path / "pwned"
    write_exploit(run / "checkpoints" / "best.safetensors", marker)
    with pytest.raises(CheckpointError, match="pickle") as e:
        load_model(run, "best")
    assert "best.safetensors" in str(e.value) and "\n" not in str(e.value)
    write_exploit(run / "prior-transformer" / "best.safetensors", marker)
    with pytest.raises(CheckpointError, match="pickle"):
        load_prior(run, "transformer")
    assert not marker.exists()


def test_pickle_checkpoint_refused_by_the_cli(run, tmp_path, rel_cache):
    marker = tmp_path / "pwned"
    write_exploit(run / "checkpoints" / "best.safetensors", marker)
    png = tmp_path / "slice.png"
    Image.fromarray(np.full((SIZE, SIZE), 100, np.uint8)).save(png)
    for args in (["evaluate", run, "--no-progress", "--device", "cpu"],
                 ["reconstruct", run, png, "--out", tmp_path / "rec", "--no-progress", "--device", "cpu"]):
        p = oasisvq(*args, cache=rel_cache)
        assert p.returncode == 2, p.stderr
        line = error_line(p.stderr)
        assert "best.safetensors" in line and "pickle" in line
    assert not marker.exists()
    assert not (tmp_path / "rec" / "slice.png").exists()


def test_checkpoint_of_another_config_is_refused_naming_the_difference(run, tmp_path):
    """Tensors of a 16-code model under metadata claiming 32 codes: the shapes that differ are named."""
    path = run / "checkpoints" / "best.safetensors"
    tensors, meta = load_checkpoint(path)
    meta["config"]["model"]["num_codes"] = 32
    save_checkpoint(path, tensors, meta)
    with pytest.raises(CheckpointError, match=r"quantizer\.codebook \(16, 4\) vs \(32, 4\)"):
        load_model(run, "best")


def test_resume_with_another_model_config_is_refused(run, data_dir, tmp_path, capsys):
    import json

    from oasisvq import cli

    from .conftest import TINY_CONFIG

    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["model"]["num_codes"] = 32
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg))
    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    code = cli.main(["train", "--data", str(data_dir), "--out", str(run), "--config", str(other), "--size",
                     str(SIZE), "--resume", "--no-progress"])
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert "model.num_codes: 16 -> 32" in line
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == before


@pytest.mark.filterwarnings("ignore:.*VQ-VAE changed")
def test_prior_of_another_vqvae_is_refused(run):
    """The VQ-VAE was retrained with 8 codes after its prior was trained on 16: sampling and resuming the
    prior are refused (the prior would emit codes the VQ-VAE does not have)."""
    from oasisvq.config import RunConfig
    from oasisvq.models import VQVAE
    from oasisvq.prior import train_prior
    from oasisvq.sampling import sample

    path = run / "checkpoints" / "best.safetensors"
    meta = load_checkpoint(path)[1]
    meta["config"]["model"]["num_codes"] = 8
    model = VQVAE(RunConfig.from_dict(meta["config"]).model)
    save_checkpoint(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    with pytest.raises(CheckpointError, match="16 codes"):
        sample(run, "transformer", n=1, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="16 codes"):
        train_prior(run, "transformer", resume=True, device="cpu", progress=False)


def test_safetensors_without_oasisvq_metadata_is_refused(run):
    path = run / "checkpoints" / "best.safetensors"
    save_file({"model.encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="without oasisvq metadata"):
        load_model(run, "best")
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "oasisvq-checkpoint", "format_version": "99"})
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(run, "best")


def test_truncated_and_foreign_checkpoints_are_refused(run):
    path = run / "checkpoints" / "best.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(run, "best")
    # a prior's checkpoint is not a VQ-VAE's
    shutil.copy(run / "prior-transformer" / "best.safetensors", path)
    with pytest.raises(CheckpointError, match="not a VQ-VAE checkpoint"):
        load_model(run, "best")


def test_config_json_cannot_instantiate_anything(tmp_path):
    """A config file is plain values: unknown keys and wrong types are refused, nothing is imported."""
    from oasisvq.config import RunConfig

    bad = tmp_path / "c.json"
    bad.write_text('{"model": {"__class__": "os.system"}}')
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig.load(bad)
    bad.write_text('{"train": {"lr": "__import__(\'os\')"}}')
    with pytest.raises(ConfigError, match="must be a number"):
        RunConfig.load(bad)
