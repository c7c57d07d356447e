"""`oasisvq demo` end to end on the embedded template, and `oasisvq report` on its run."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from oasisvq.checkpoint import load_checkpoint
from oasisvq.cli import main
from oasisvq.config import DataConfig, RunConfig, TrainConfig, model_preset
from oasisvq.data import load_slices
from oasisvq.demo import read_demo_steps, run_demo
from oasisvq.errors import ConfigError
from oasisvq.tokenizer import load_model, train

from .conftest import load_benchmark

pytest.importorskip("nilearn", reason="the demo's embedded MRI ships with nilearn (pip install oasisvq[demo])")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.6", "--samples", "16", "--no-progress"]) == 0
    return out


def test_demo_writes_every_artefact(demo, capsys):
    for split in ("train", "validate", "test"):
        pngs = list((demo / "data" / split).glob("*.png"))
        assert pngs, split
    assert Image.open(pngs[0]).size == (256, 256)
    run = demo / "run"
    for name in ("config.json", "metrics.csv", "checkpoints/best.safetensors", "checkpoints/last.safetensors",
                 "figures/training_curves.png", "figures/validation_grid.png", "figures/codebook_usage.png",
                 "eval-test/per_slice.csv", "eval-test/best_median_worst.png", "eval-test/ssim_histogram.png",
                 "prior-maskgit/best.safetensors", "prior-maskgit/curve.png"):
        assert (run / name).is_file(), name
    m = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert 0 < m["model"]["ssim"]["mean"] <= 1 and 0 <= m["floors"]["all_black"]["ssim"]["mean"] < 1
    assert m["code_grid"] == 16 and m["slices"] > 0
    samples = sorted((demo / "samples").glob("sample_*.png"))
    assert len(samples) == 16
    for p in samples:
        a = np.asarray(Image.open(p))
        assert a.shape == (256, 256) and a.dtype == np.uint8
    g = json.loads((demo / "samples" / "samples_metrics.json").read_text())
    assert g["n_samples"] == 16
    assert np.isfinite(g["fidelity"]["frechet"]) and np.isfinite(g["fidelity"]["frechet_floor"])
    assert g["fidelity"]["frechet"] >= 0 and 0 <= g["memorisation"]["copies"] <= 16
    info = json.loads((demo / "demo.json").read_text())
    assert info["data"]["kind"] == "mni152-template" and info["total_s"] > 0
    step_of = lambda path: load_checkpoint(path)[1]["step"]
    assert info["steps"] == {"train_vqvae": step_of(run / "checkpoints" / "last.safetensors"),
                             "train_prior": step_of(run / "prior-maskgit" / "last.safetensors")}
    assert min(info["steps"].values()) > 0
    md = (demo / "report" / "report.md").read_text()
    assert re.search(rf"\| train_vqvae \| [\d.]+ \| {info['steps']['train_vqvae']} \|", md)  # the report's timings table


def test_demo_report_is_self_contained(demo):
    html = (demo / "report" / "report.html").read_text()
    md = (demo / "report" / "report.md").read_text()
    # no external resource: every src/href is an inline data URI
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    assert "<link" not in html and "<script" not in html
    figures = sorted((demo / "report" / "figures").glob("*.png"))
    assert len(re.findall(r'src="data:image/png;base64,', html)) == len(figures) >= 8
    for f in figures:
        assert f"figures/{f.name}" in md
    assert "MNI ICBM152" in html and "not OASIS data" in html
    assert "Data were provided by OASIS" not in html  # no OASIS data was used
    for section in ("Reconstruction on held-out test slices", "Prior over the codes", "Generated slices",
                    "Timings and machine"):
        assert section in html and section in md


def test_report_command_rewrites_report(demo, tmp_path):
    assert main(["report", str(demo / "run"), "--out", str(tmp_path / "r"),
                 "--samples", str(demo / "samples")]) == 0
    assert (tmp_path / "r" / "report.html").stat().st_size > 10_000


def test_demo_refuses_foreign_folder(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.1", "--no-progress"]) == 2
    assert "not an oasisvq demo folder" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_steps_from_a_demo_json(demo, tmp_path):
    steps = json.loads((demo / "demo.json").read_text())["steps"]
    assert list(steps) == ["train_vqvae", "train_prior"] and read_demo_steps(demo / "demo.json") == steps
    bad = tmp_path / "demo.json"
    for text, problem in (("{", "not the demo.json"), ('{"minutes": 10}', "not the demo.json"),
                          ('{"steps": {"train_vqvae": 5}}', "not positive step counts"),
                          ('{"steps": {"train_vqvae": 5, "train_prior": 0}}', "not positive step counts")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            read_demo_steps(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_demo_steps(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="one-level demo"):
        run_demo(tmp_path / "out", data=[str(demo / "data")], two_level=False,
                 stage_steps={"train_vqvae": 1, "train_prior": 1, "train_vqvae_fine": 1, "train_upsampler": 1})


def test_budget_split_leaves_the_measured_overhead():
    from oasisvq.demo import budget_split

    for minutes, overhead in ((0.6, 0.12), (10, 2.0), (60, 4.5)):
        vq, prior = budget_split(minutes)
        assert vq + prior + overhead == pytest.approx(minutes)
        assert vq / prior == pytest.approx(65 / 35)


def test_two_level_split_gives_the_upsampler_the_largest_share():
    from oasisvq.demo import two_level_split

    for minutes, overhead in ((1, 0.2), (60, 7.8)):
        parts = two_level_split(minutes)
        assert sum(parts) + overhead == pytest.approx(minutes)
        assert parts[3] == max(parts) and parts[0] < parts[1] < parts[2]  # the upsampler's share is the largest


def test_two_level_demo_samples_through_the_upsampler(demo, tmp_path, monkeypatch):
    """The demo's two-level recipe (16x16 layout + 64x64 detail) on a step budget, and the budget benchmark's
    row of it."""
    data = tmp_path / "data"  # every 4th training slice: the wiring is under test, and encoding all is slow
    for split in ("train", "validate", "test"):
        (data / split).mkdir(parents=True)
        for png in sorted((demo / "data" / split).glob("*.png"))[::4 if split == "train" else 1]:
            (data / split / png.name).symlink_to(png)
    out = tmp_path / "budget-1"
    # the stages' steps instead of minutes, as `oasisvq demo --steps-from` replays them: the four stages
    # say that there are two levels, though 0.6 minutes alone would give one
    steps = {"train_vqvae": 5, "train_prior": 4, "train_vqvae_fine": 3, "train_upsampler": 6}
    r = run_demo(out, minutes=0.6, data=[str(data)], samples=16, progress=False, stage_steps=steps)
    info = json.loads((out / "demo.json").read_text())
    assert info["recipe"] == {"two_level": True, "prior": "upsampler", "run": str(out / "run"),
                              "layout_run": str(out / "layout-run")}
    assert r["steps"] == info["steps"] == info["stage_steps"] == steps
    assert read_demo_steps(out / "demo.json") == steps
    assert "made the steps an earlier demo made" in (out / "report" / "report.md").read_text()
    assert (out / "layout-run" / "prior-maskgit" / "best.safetensors").is_file()
    assert (out / "run" / "prior-upsampler" / "best.safetensors").is_file()
    m = json.loads((out / "run" / "eval-test" / "metrics.json").read_text())
    assert m["code_grid"] == 64 and r["ssim"] == m["model"]["ssim"]["mean"]
    s = json.loads((out / "samples" / "samples.json").read_text())
    assert s["prior"] == "upsampler" and len(s["files"]) == 16 and s["levels"] is not None
    assert all(Image.open(out / "samples" / f).size == (256, 256) for f in s["files"])
    assert "whose maskgit prior draws the layout" in (out / "report" / "report.md").read_text()

    bench = load_benchmark("generation")
    replayed = []  # read the folder just written; --steps-from DIR hands DIR/budget-M's steps to the demo
    monkeypatch.setattr(bench, "run_demo", lambda *a, **k: replayed.append(k["stage_steps"]))
    (row,) = bench._budget_rows(demo / "data", [1], tmp_path, 16, "cpu", steps_from=tmp_path)
    assert replayed == [steps] and row["stage steps"] == steps
    assert row["grid"] == "16x16+64x64" and row["prior"] == "upsampler"
    elapsed = lambda path: load_checkpoint(path)[1]["elapsed_s"] / 60
    assert row["tok min"] == pytest.approx(elapsed(out / "run" / "checkpoints" / "last.safetensors") +
                                           elapsed(out / "layout-run" / "checkpoints" / "last.safetensors"))
    assert row["prior min"] == pytest.approx(elapsed(out / "run" / "prior-upsampler" / "last.safetensors") +
                                             elapsed(out / "layout-run" / "prior-maskgit" / "last.safetensors"))


def test_budget_benchmark_rows_read_a_demo_folder(demo):
    # benchmarks/generation.py --budgets runs the demo at each budget and reads its folder back like this
    bench = load_benchmark("generation")
    rec = json.loads((demo / "run" / "eval-test" / "metrics.json").read_text())
    rep = json.loads((demo / "samples" / "samples_metrics.json").read_text())
    row = bench._row("demo", "maskgit", demo / "run", rec, rep, 2.5, demo / "samples")
    assert row["grid"] == "16x16" and row["SSIM"] == rec["model"]["ssim"]["mean"] and row["steps"] > 0
    assert row["2-sample acc"] == f"{rep['fidelity']['two_sample_accuracy']:.2f} " \
                                  f"[{rep['fidelity']['two_sample_accuracy_floor']:.2f}]"
    assert "| demo | 16x16 | maskgit |" in bench._table([row])
    with pytest.raises(SystemExit):  # --budgets needs --data and --out
        bench.main(["--budgets", "1"])


def test_demo_tokeniser_leaves_the_mean_image_within_one_epoch(demo, tmp_path):
    """Regression: with PyTorch's default init the demo's 16x tokeniser output the template's mean image for
    hundreds of steps (every slice reconstructed alike; one fresh-clone demo never left it)."""
    cfg = RunConfig(data=DataConfig(paths=[str(demo / "data")]), model=model_preset("cpu-f16"),
                    train=TrainConfig(epochs=1, batch_size=16, warmup_steps=10, val_slices=16, compile="off"))
    train(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)  # 49 steps
    model, _ = load_model(tmp_path / "run", "last")
    held_out = load_slices(cfg.data, cache_dir=tmp_path / "cache", progress=False).split("validate")
    x = held_out.tensor(range(0, len(held_out), 2))
    with torch.no_grad():
        recon = model.decode_indices(model.encode(x))
    spread = lambda t: float(t.std(dim=0).mean())  # how much slices differ from one another, pixel by pixel
    assert spread(recon) > 0.3 * spread(x), (spread(recon), spread(x))
    assert float((recon - x).abs().mean()) < float((x.mean(0, keepdim=True) - x).abs().mean())
