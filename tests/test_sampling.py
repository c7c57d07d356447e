"""train_prior / sample / evaluate_sample_dir on a tiny hand-made run (no real data, seconds each)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from oasisvq import prior, sampling
from oasisvq.checkpoint import load_checkpoint, save_checkpoint
from oasisvq.config import DataConfig, ModelConfig, RunConfig
from oasisvq.data import SliceSet
from oasisvq.errors import CheckpointError, ConfigError, DataError
from oasisvq.evaluation import evaluate_sample_dir
from oasisvq.models import VQVAE
from oasisvq.models.priors import MaskGITPrior, level_coordinates

from .conftest import load_benchmark

SIZE = 32


def _slices(n_per_split=(12, 6, 6), seed=0) -> SliceSet:
    """Ellipse phantoms with a relative position that sets their size, in train/validate/test splits."""
    g = np.random.default_rng(seed)
    n = sum(n_per_split)
    yy, xx = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]
    pos = g.uniform(0, 1, n).astype(np.float32)
    imgs = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        a = 0.4 + 0.5 * pos[i]
        r = (xx / a) ** 2 + (yy / (a * 1.2)) ** 2
        imgs[i] = np.clip(80 * (r < 1) + 80 * (r < 0.5) + 60 * (r < 0.2) + g.normal(0, 3, r.shape) * (r < 1), 0, 255)
    splits = [s for s, k in zip(("train", "validate", "test"), n_per_split) for _ in range(k)]
    index = {"subjects": [f"s{i // 3}" for i in range(n)], "sources": ["synthetic"] * n, "slices": list(range(n)),
             "splits": splits, "positions": pos.tolist()}
    return SliceSet(imgs, index)


def make_run(run_dir, downsample: int = 8, num_codes: int = 16, size: int = SIZE, data: str = "synthetic"):
    """A run folder with a (random-weight) tiny VQ-VAE checkpoint in the format training.py writes."""
    stages = downsample.bit_length() - 1
    cfg = RunConfig(data=DataConfig(paths=[data], size=size),
                    model=ModelConfig(downsample=downsample, channels=(8,) * stages, hidden=8, res_blocks=1,
                                      num_codes=num_codes, code_dim=4))
    torch.manual_seed(0)
    model = VQVAE(cfg.model)
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg.save(run_dir / "config.json")
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name in ("best", "last"):
        save_checkpoint(run_dir / "checkpoints" / f"{name}.safetensors", tensors,
                        {"kind": "vqvae", "config": cfg.to_dict()})
    return run_dir


@pytest.fixture()
def run(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path / "run")
    data = _slices()
    monkeypatch.setattr("oasisvq.data.load_slices", lambda *a, **kw: data)
    return run_dir


TINY = {"layers": 2, "width": 16, "heads": 2, "batch_size": 4, "kernel": 3}


def _weights(path):
    return {k: v for k, v in load_checkpoint(path)[0].items() if k.startswith("model.")}


def test_train_prior_writes_outputs_and_resume_matches_straight_run(run, tmp_path):
    res = prior.train_prior(run, "transformer", epochs=2, progress=False, dropout=0.2, **TINY)
    pdir = run / "prior-transformer"
    for name in ("last.safetensors", "best.safetensors", "metrics.csv", "curve.png", "codes.safetensors"):
        assert (pdir / name).is_file(), name
    with open(pdir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["epoch"]) for r in rows] == [1.0, 2.0]
    assert 0 < res["val_bits"] < 6 and res["step"] == 2 * 3  # 12 train grids / batch 4 = 3 steps per epoch
    straight = _weights(pdir / "last.safetensors")

    # the same two epochs as one epoch + resume give identical weights (order, dropout RNG, optimizer)
    (pdir / "last.safetensors").unlink()
    prior.train_prior(run, "transformer", epochs=1, progress=False, overwrite=True, dropout=0.2, **TINY)
    prior.train_prior(run, "transformer", epochs=2, resume=True, progress=False)
    resumed = _weights(pdir / "last.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)
    with open(pdir / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2

    with pytest.raises(ConfigError):  # refuses to overwrite silently
        prior.train_prior(run, "transformer", epochs=1, progress=False, **TINY)
    with pytest.raises(ConfigError):  # resume keeps the saved architecture
        prior.train_prior(run, "transformer", epochs=3, resume=True, progress=False, width=32)


def test_train_prior_step_budget(run):
    # a step budget alone rules (no default 10 epochs), ends mid-epoch, and a resumed run extends it
    res = prior.train_prior(run, "maskgit", max_steps=4, progress=False, **TINY)
    assert res["step"] == 4 and not res["stopped_by_time"]
    res = prior.train_prior(run, "maskgit", max_steps=7, resume=True, progress=False)
    assert res["step"] == 7
    assert prior.saved_config(load_checkpoint(run / "prior-maskgit" / "last.safetensors")[1]).max_steps == 7
    with pytest.raises(ConfigError, match="max_steps"):
        prior.train_prior(run, "maskgit", max_steps=-1, overwrite=True, progress=False, **TINY)


def test_tilts_train_also_on_the_codes_of_tilted_training_volumes_and_are_cached(tmp_path, monkeypatch):
    import nibabel as nib

    from oasisvq import data as data_module

    from .test_data import _head_volume

    for i in range(5):
        nib.save(nib.Nifti1Image(_head_volume(seed=i), np.eye(4)), tmp_path / f"sub-{i:04d}.nii.gz")
    run_dir = make_run(tmp_path / "run", data=str(tmp_path))
    options = dict(epochs=1, num_classes=4, cache_dir=tmp_path / "cache", progress=False, **TINY)
    res = prior.train_prior(run_dir, "maskgit", tilts=2, **options)
    codes, meta = load_checkpoint(run_dir / "prior-maskgit" / "codes.safetensors")
    n_train, n_tilted = len(codes["train.codes"]), len(codes["train.tilted.codes"])
    assert meta["tilts"] == [2, 0, data_module.TILT_VERSION]  # copies, seed, resampling
    assert 1.5 * n_train < n_tilted < 2.5 * n_train  # two copies of each volume
    assert res["step"] == (n_train + n_tilted) // TINY["batch_size"]  # one epoch over both
    vq, run_cfg = prior.open_run(run_dir, torch.device("cpu"))
    first, levels = next(data_module.tilted_slices(run_cfg.data, 2, 0, progress=False))
    assert torch.equal(codes["train.tilted.codes"][:len(first)], prior.encode_slices(vq, first, torch.device("cpu")))
    assert torch.equal(codes["train.tilted.position"][:len(first)], torch.from_numpy(levels))

    def no_tilting(*a, **kw):
        raise AssertionError("tilted again")

    monkeypatch.setattr("oasisvq.data.tilted_slices", no_tilting)  # a second prior reads the cached copies
    again = prior.train_prior(run_dir, "maskgit", tilts=2, overwrite=True, **options)
    assert again["step"] == res["step"]
    with pytest.raises(AssertionError, match="tilted again"):  # another seed draws other copies
        prior.train_prior(run_dir, "maskgit", tilts=2, seed=1, overwrite=True, **options)
    cache = run_dir / "prior-maskgit" / "codes.safetensors"
    save_checkpoint(cache, codes, {**meta, "tilts": [2, 0, data_module.TILT_VERSION - 1]})
    with pytest.raises(AssertionError, match="tilted again"):  # so do copies an older tilt_volume made
        prior.train_prior(run_dir, "maskgit", tilts=2, overwrite=True, **options)
    with pytest.raises(ConfigError, match="prior.tilts"):
        prior.train_prior(run_dir, "upsampler", tilts=2, coarse_run=str(run_dir), **options)


def test_train_prior_stops_on_time_budget(run):
    res = prior.train_prior(run, "pixelcnn", epochs=1000, max_minutes=1e-9, progress=False, **TINY)
    # the budget is spent before the first step: nothing trained, nothing checkpointed
    assert res.get("stopped_by_time") and not (run / "prior-pixelcnn" / "last.safetensors").exists()


def test_train_prior_with_only_a_time_budget_is_not_capped_at_ten_epochs(run, one_thread):
    res = prior.train_prior(run, "pixelcnn", max_minutes=0.1, progress=False, **TINY)
    meta = load_checkpoint(run / "prior-pixelcnn" / "last.safetensors")[1]
    assert meta["prior_config"]["epochs"] == 0 and res["stopped_by_time"]
    assert res["step"] > 10 * 3  # 10 epochs of 3 steps was the old cap


def test_sample_reproducible_pngs_and_guards(run, tmp_path):
    prior.train_prior(run, "pixelcnn", epochs=1, progress=False, num_classes=0, **TINY)  # unconditional
    a = sampling.sample(run, "pixelcnn", n=5, out=tmp_path / "a", seed=3, batch_size=2, progress=False)
    sampling.sample(run, "pixelcnn", n=5, out=tmp_path / "b", seed=3, batch_size=2, progress=False)
    sampling.sample(run, "pixelcnn", n=5, out=tmp_path / "c", seed=4, batch_size=2, progress=False)
    names = [f"sample_{i:03d}.png" for i in range(5)]
    assert a["files"] == names and a["samples_per_second"] > 0
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in names]
    other = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes() for f in names]
    assert all(same) and not all(other)
    assert (tmp_path / "a" / "samples_grid.png").is_file()
    from PIL import Image

    with Image.open(tmp_path / "a" / names[0]) as im:
        assert im.mode == "L" and im.size == (SIZE, SIZE)

    with pytest.raises(ConfigError):
        sampling.sample(run, "pixelcnn", n=0, out=tmp_path / "d", progress=False)
    with pytest.raises(ConfigError):
        sampling.sample(run, "pixelcnn", n=1, out=tmp_path / "d", prefix="../escape", progress=False)
    with pytest.raises(ConfigError):
        sampling.sample(run, "pixelcnn", n=1, out=tmp_path / "d", cond=1, progress=False)  # unconditional
    with pytest.raises(ConfigError):
        sampling.sample(run, "gan", n=1, out=tmp_path / "d", progress=False)
    with pytest.raises(CheckpointError):
        sampling.sample(run, "transformer", n=1, out=tmp_path / "d", progress=False)  # not trained
    assert not (tmp_path.parent / "escape_000.png").exists()


def test_conditional_prior_and_sample_metrics(run, tmp_path):
    prior.train_prior(run, "transformer", epochs=1, progress=False, num_classes=3, **TINY)
    info = sampling.sample(run, "transformer", n=4, out=tmp_path / "s", cond=2, seed=0, progress=False)
    assert info["classes"] == [2, 2, 2, 2]
    with pytest.raises(ConfigError):
        sampling.sample(run, "transformer", n=1, out=tmp_path / "s", cond=3, progress=False)
    mixed = sampling.sample(run, "transformer", n=6, out=tmp_path / "m", seed=0, progress=False)
    assert all(0 <= c < 3 for c in mixed["classes"])

    report = evaluate_sample_dir(run, tmp_path / "m", progress=False)
    saved = json.loads((tmp_path / "m" / "samples_metrics.json").read_text())
    assert saved["n_samples"] == 6 and saved["heldout_split"] == "test"
    assert report["samples_per_second"] == pytest.approx(mixed["samples_per_second"])
    for key in ("fidelity", "diversity", "memorisation", "anatomy"):
        assert key in saved
    assert np.isfinite(saved["fidelity"]["frechet_floor"])
    # the floor through the run's own (barely trained, so lossy) tokeniser is measured and differs from it
    assert np.isfinite(saved["fidelity"]["frechet_decoded"])
    assert saved["fidelity"]["frechet_decoded"] != saved["fidelity"]["frechet_floor"]


def test_position_classes():
    got = prior.position_classes(np.array([0.0, 0.32, 0.34, 0.99, 1.0]), 3)
    assert got.tolist() == [0, 0, 1, 2, 2]
    with pytest.raises(DataError):
        prior.position_classes(np.array([0.5, np.nan]), 3)


def test_benchmark_script_prints_a_table(run, tmp_path, capsys, monkeypatch):
    data = _slices((40, 6, 6))  # at least one batch of the default prior batch size (32)
    monkeypatch.setattr("oasisvq.data.load_slices", lambda *a, **kw: data)
    bench = load_benchmark("generation")
    rc = bench.main(["--runs", str(run), "--kinds", "transformer", "pixelcnn", "--steps", "2", "--n", "4",
                     "--layers", "1", "--width", "16", "--out", str(tmp_path / "bench"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "transformer" in out and "pixelcnn" in out and "Frechet" in out and "samples/s" in out
    assert (tmp_path / "bench" / "run" / "pixelcnn" / "samples_metrics.json").is_file()
    rows = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert [r["steps"] for r in rows] == [2, 2]  # a step budget per prior


def test_resume_after_a_crash_mid_epoch(run, monkeypatch):
    prior.train_prior(run, "transformer", epochs=2, progress=False, dropout=0.2, **TINY)
    pdir = run / "prior-transformer"
    straight = _weights(pdir / "last.safetensors")

    monkeypatch.setattr("oasisvq.training.SAVE_EVERY_S", 0.0)  # checkpoint after every step
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def crash_on_fifth(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # step 5 = second step of epoch 2 (3 steps per epoch)
            raise KeyboardInterrupt
        return real_clip(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        prior.train_prior(run, "transformer", epochs=2, progress=False, overwrite=True, dropout=0.2, **TINY)
    meta = load_checkpoint(pdir / "last.safetensors")[1]
    assert (meta["epoch"], meta["step_in_epoch"], meta["step"]) == (1, 1, 4)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    prior.train_prior(run, "transformer", epochs=2, resume=True, progress=False)
    resumed = _weights(pdir / "last.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)


def test_cli_commands(run, tmp_path, capsys):
    from oasisvq.cli import main

    assert main(["sample", str(run), "-n", "2", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "no trained maskgit prior" in capsys.readouterr().err
    assert main(["train-prior", str(run), "--kind", "pixelcnn", "--epochs", "1", "--layers", "1", "--width", "8",
                 "--kernel", "3", "--batch-size", "6", "--no-progress"]) == 0
    assert main(["train-prior", str(run), "--kind", "pixelcnn", "--epochs", "2", "--resume", "--no-progress"]) == 0
    assert main(["sample", str(run), "--prior", "pixelcnn", "-n", "3", "--out", str(tmp_path / "s"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("sample_*.png")) == [f"sample_00{i}.png" for i in range(3)]
    assert main(["evaluate-samples", str(run), str(tmp_path / "s"), "--device", "cpu", "--no-progress"]) == 0
    assert "Frechet" in capsys.readouterr().out
    written = (tmp_path / "s" / "samples_metrics.json").read_bytes()
    # one folder per split: --out keeps the samples folder's own metrics as they were
    assert main(["evaluate-samples", str(run), str(tmp_path / "s"), "--split", "validate", "--out",
                 str(tmp_path / "s-validate"), "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "s" / "samples_metrics.json").read_bytes() == written
    assert json.loads((tmp_path / "s-validate" / "samples_metrics.json").read_text())["heldout_split"] == "validate"
    assert (tmp_path / "s-validate" / "nearest_real.png").is_file()


def test_a_grouped_maskgit_trains_and_samples_from_the_cli(run, tmp_path, capsys):
    from oasisvq.cli import main

    common = ["--kind", "maskgit", "--epochs", "1", "--layers", "1", "--width", "16", "--heads", "2",
              "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert main(["train-prior", str(run), "--group", "2", *common]) == 0
    meta = load_checkpoint(run / "prior-maskgit" / "best.safetensors")[1]
    assert meta["prior_config"]["group"] == 2
    assert main(["sample", str(run), "-n", "3", "--steps", "4", "--out", str(tmp_path / "g"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert len(list((tmp_path / "g").glob("sample_*.png"))) == 3
    capsys.readouterr()
    assert main(["train-prior", str(run), "--group", "3", "--overwrite", *common]) == 2  # a 4x4 grid
    assert "3x3 groups" in capsys.readouterr().err
    assert load_checkpoint(run / "prior-maskgit" / "best.safetensors")[1] == meta  # nothing written lost
    assert main(["train-prior", str(run), "--group", "2", "--kind", "pixelcnn"]) == 2
    assert "prior.group" in capsys.readouterr().err


def test_priors_condition_on_the_level_by_default_where_slices_have_one(run, tmp_path, monkeypatch):
    res = prior.train_prior(run, "maskgit", epochs=2, progress=False, **TINY)
    meta = load_checkpoint(run / "prior-maskgit" / "last.safetensors")[1]
    assert meta["prior_config"]["num_classes"] == prior.LEVEL_CLASSES and meta["prior_format"] == prior.PRIOR_FORMAT
    assert 0 < res["val_bits"] < 6 and res["step"] == 2 * 3
    info = sampling.sample(run, "maskgit", n=6, out=tmp_path / "lv", level=(0.2, 0.4), guidance=2.0, steps=4,
                           progress=False)
    assert all(0.2 <= v <= 0.4 for v in info["levels"]) and len(info["levels"]) == 6
    assert info["classes"] == [int(v * prior.LEVEL_CLASSES) for v in info["levels"]]
    # slices without a level (PNG sets without slice numbers): an unconditional prior, and no level choice
    data = _slices()
    data = SliceSet(data.images, dict(data.index, positions=[float("nan")] * len(data)))
    monkeypatch.setattr("oasisvq.data.load_slices", lambda *a, **kw: data)
    (run / "prior-pixelcnn").mkdir()
    prior.train_prior(run, "pixelcnn", epochs=1, progress=False, **TINY)
    assert load_checkpoint(run / "prior-pixelcnn" / "last.safetensors")[1]["prior_config"]["num_classes"] == 0
    with pytest.raises(ConfigError, match="steps"):
        sampling.sample(run, "pixelcnn", n=1, out=tmp_path / "x", steps=4, progress=False)
    with pytest.raises(ConfigError, match="choice temperature"):
        sampling.sample(run, "pixelcnn", n=1, out=tmp_path / "x", choice_temperature=1.0, progress=False)
    for bad in ({"level": 0.5}, {"guidance": 2.0}):
        with pytest.raises(ConfigError, match="conditional prior"):
            sampling.sample(run, "pixelcnn", n=1, out=tmp_path / "y", progress=False, **bad)


def test_priors_learn_and_sample_exact_levels_and_older_priors_keep_their_bins(run, tmp_path, monkeypatch):
    conds = []
    real_loss, real_sample = MaskGITPrior.loss, MaskGITPrior.sample
    monkeypatch.setattr(MaskGITPrior, "loss", lambda self, x, cond=None: conds.append(cond) or real_loss(self, x, cond))
    prior.train_prior(run, "maskgit", epochs=1, progress=False, **TINY)
    trained = torch.cat(conds)  # training batches and validation: each slice's exact level as a fractional class
    assert trained.is_floating_point() and (trained != trained.round()).any()
    monkeypatch.setattr(MaskGITPrior, "sample",
                        lambda self, *a, cond=None, **kw: conds.append(cond) or real_sample(self, *a, cond=cond, **kw))
    info = sampling.sample(run, "maskgit", n=4, out=tmp_path / "exact", level=(0.2, 0.4), steps=2, progress=False)
    expected = level_coordinates(torch.tensor(info["levels"]), prior.LEVEL_CLASSES)
    assert torch.allclose(conds[-1].cpu(), expected, atol=1e-3)  # the levels are rounded in samples.json
    for name in ("best", "last"):  # a prior saved before interpolate_levels existed learned bins
        path = run / "prior-maskgit" / f"{name}.safetensors"
        tensors, meta = load_checkpoint(path)
        del meta["prior_config"]["interpolate_levels"]
        save_checkpoint(path, tensors, meta)
    info = sampling.sample(run, "maskgit", n=4, out=tmp_path / "bins", level=(0.2, 0.4), steps=2, progress=False)
    assert conds[-1].dtype == torch.long and conds[-1].tolist() == info["classes"]
    conds.clear()
    prior.train_prior(run, "maskgit", epochs=2, resume=True, progress=False)
    assert all(c.dtype == torch.long for c in conds)  # resumed, it goes on learning bins


def test_a_conditional_prior_of_the_previous_format_fails_with_one_line(run):
    prior.train_prior(run, "transformer", epochs=1, progress=False, num_classes=3, **TINY)
    path = run / "prior-transformer" / "best.safetensors"
    tensors, meta = load_checkpoint(path)
    del meta["prior_format"]
    meta["oasisvq_version"] = "0.1.0"
    save_checkpoint(path, tensors, meta)
    with pytest.raises(CheckpointError, match=r"oasisvq 0\.1\.0 \(prior format 1\).*--overwrite"):
        prior.load_prior(run, "transformer")


def test_a_prior_from_a_later_version_fails_with_one_line(run):
    """A prior of a later format, or with an option this version lacks, names the file and the option."""
    prior.train_prior(run, "transformer", epochs=1, progress=False, **TINY)
    path = run / "prior-transformer" / "best.safetensors"
    tensors, meta = load_checkpoint(path)
    save_checkpoint(path, tensors, dict(meta, prior_config=dict(meta["prior_config"], image_dropout=0.1)))
    with pytest.raises(CheckpointError, match=rf"{path}.*options image_dropout\).*cannot rebuild"):
        prior.load_prior(run, "transformer")
    save_checkpoint(path, tensors, dict(meta, prior_format=prior.PRIOR_FORMAT + 1))
    with pytest.raises(CheckpointError, match=rf"prior format {prior.PRIOR_FORMAT + 1}\).*cannot rebuild"):
        prior.load_prior(run, "transformer")
    save_checkpoint(path, tensors, meta)
    assert prior.load_prior(run, "transformer")[1]["prior_format"] == prior.PRIOR_FORMAT


def test_a_format_2_prior_still_loads_and_resumes(run, tmp_path):
    """Format 3 changed only the upsampler; other priors of format 2 carry an unused coarse_codes field."""
    prior.train_prior(run, "maskgit", epochs=1, progress=False, num_classes=3, **TINY)
    for name in ("best", "last"):
        path = run / "prior-maskgit" / f"{name}.safetensors"
        tensors, meta = load_checkpoint(path)
        save_checkpoint(path, tensors, dict(meta, prior_format=2, prior_config=dict(meta["prior_config"], coarse_codes=0)))
    model, meta = prior.load_prior(run, "maskgit")
    assert meta["prior_format"] == 2 and model.num_classes == 3
    assert prior.train_prior(run, "maskgit", epochs=2, resume=True, progress=False)["step"] > 0
    assert len(sampling.sample(run, "maskgit", n=2, out=tmp_path / "s", progress=False)["files"]) == 2
