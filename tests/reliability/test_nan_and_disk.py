"""Promises 3 and 6: a NaN stops training without writing anything; a full disk during a checkpoint write
leaves the previous checkpoint byte-identical and no temp file; a folder holding a run is never
overwritten without --resume or --overwrite."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

import oasisvq.checkpoint as ckpt
from oasisvq import cli
from oasisvq.checkpoint import load_checkpoint, save_checkpoint
from oasisvq.config import RunConfig
from oasisvq.errors import TrainingError
from oasisvq.tokenizer import prepare_run_dir, train

from .conftest import SIZE, TINY_CONFIG, error_line


def tiny_cfg(data: Path, epochs: int) -> RunConfig:
    cfg = RunConfig.from_dict(TINY_CONFIG)
    cfg.data.paths, cfg.data.size, cfg.train.epochs = [str(data)], SIZE, epochs
    return cfg


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture()
def one_epoch_run(tmp_path, trained_run) -> Path:
    """A copy of a finished 1-epoch run (6 steps; checkpoints at steps 3 and 6)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# ------------------------------------------------------------------------------------------------ NaN


def test_nan_loss_stops_with_step_and_cause_and_writes_nothing(one_epoch_run, data_dir, rel_cache):
    ck = one_epoch_run / "checkpoints"
    before = snapshot(ck)
    metrics_before = (one_epoch_run / "metrics.csv").read_bytes()
    with pytest.raises(TrainingError) as e:
        train(tiny_cfg(data_dir, 2), one_epoch_run, resume=True, cache_dir=rel_cache, progress=False,
              _fault_at_step=8)
    msg = str(e.value)
    assert "at step 8" in msg and "nan" in msg.lower()
    assert "learning rate" in msg and "--resume" in msg  # the likely cause and what to do
    assert snapshot(ck) == before  # byte-identical, nothing new (no temp files either)
    assert (one_epoch_run / "metrics.csv").read_bytes() == metrics_before


def test_nan_in_a_fresh_run_keeps_the_first_checkpoint(tmp_path, data_dir, rel_cache):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="at step 4"):
        train(tiny_cfg(data_dir, 1), out, cache_dir=rel_cache, progress=False, _fault_at_step=4)
    tensors, meta = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert meta["step"] == 3
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_nonfinite_weights_are_never_checkpointed(one_epoch_run, data_dir, rel_cache, monkeypatch):
    """A step whose loss was finite but whose update broke the weights: the next checkpoint refuses."""
    ck = one_epoch_run / "checkpoints"
    before = snapshot(ck)
    real_step = torch.optim.AdamW.step
    calls = []

    def poisoned_step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:  # global step 9 = a checkpoint step (evals at 3 and 6 of each epoch)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(TrainingError, match=r"non-finite values in .* after step 9") as e:
        train(tiny_cfg(data_dir, 2), one_epoch_run, resume=True, cache_dir=rel_cache, progress=False)
    assert "learning rate" in str(e.value)
    assert snapshot(ck) == before


# ------------------------------------------------------------------------------------------ full disk


def _enospc_after_partial_write(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x00" * 100)  # a partial file, as a disk filling up mid-write leaves it
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.arange(10.0)}, {"step": 1})
    before = path.read_bytes()
    monkeypatch.setattr(ckpt, "save_file", _enospc_after_partial_write)
    with pytest.raises(OSError) as e:
        save_checkpoint(path, {"w": torch.zeros(10)}, {"step": 2})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_full_disk_as_safetensors_reports_it(tmp_path, monkeypatch):
    """safetensors reports a real ENOSPC as SafetensorError; it must still become a clean OSError."""
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x01" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    path = tmp_path / "best.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {})
    before = path.read_bytes()
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OSError) as e:
        save_checkpoint(path, {"w": torch.zeros(3)}, {})
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_full_disk_mid_training_cli_one_line_and_run_intact(one_epoch_run, rel_cache, monkeypatch, capsys):
    ck = one_epoch_run / "checkpoints"
    before = snapshot(ck)
    monkeypatch.setattr(ckpt, "save_file", _enospc_after_partial_write)
    code = cli.main(["train", "--out", str(one_epoch_run), "--resume", "--epochs", "2", "--no-progress",
                     "--cache-dir", str(rel_cache)])
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line and ".safetensors" in line
    assert snapshot(ck) == before
    monkeypatch.undo()
    # once space is back, the run resumes from its intact checkpoint
    assert cli.main(["train", "--out", str(one_epoch_run), "--resume", "--epochs", "2", "--no-progress",
                     "--cache-dir", str(rel_cache)]) == 0
    assert load_checkpoint(ck / "last.safetensors")[1]["step"] == 12


# ------------------------------------------------------------------------------------------ run folders


def test_existing_run_refused_without_resume_or_overwrite(one_epoch_run, data_dir, tiny_config, rel_cache, capsys):
    before = snapshot(one_epoch_run / "checkpoints")
    args = ["train", "--data", str(data_dir), "--out", str(one_epoch_run), "--config", str(tiny_config),
            "--epochs", "1", "--size", str(SIZE), "--no-progress", "--cache-dir", str(rel_cache)]
    assert cli.main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert str(one_epoch_run) in line and "--resume" in line and "--overwrite" in line
    assert snapshot(one_epoch_run / "checkpoints") == before

    assert cli.main(["train-prior", str(one_epoch_run), "--kind", "transformer", "--no-progress"]) == 2  # exists
    line = error_line(capsys.readouterr().err)
    assert "prior-transformer" in line and "--overwrite" in line

    assert cli.main(args + ["--overwrite", "--seed", "7"]) == 0
    capsys.readouterr()
    assert snapshot(one_epoch_run / "checkpoints") != before
    assert load_checkpoint(one_epoch_run / "checkpoints" / "last.safetensors")[1]["config"]["train"]["seed"] == 7


def test_resume_cleans_temp_files_left_by_a_kill(one_epoch_run, rel_cache):
    ck = one_epoch_run / "checkpoints"
    stale = ck / ".last.safetensors.abc123.tmp"
    stale.write_bytes(b"partial")
    prepare_run_dir(one_epoch_run, resume=True, overwrite=False)
    assert not stale.exists()
    load_checkpoint(ck / "last.safetensors")
