"""Promise 5: every command, given a wrong path, a broken file or an out-of-range option, ends with exit code
2 and exactly one stderr line ``oasisvq: error: ...`` that names the file or option. No tracebacks.

Most cases call ``cli.main`` in-process (the same code path as the console script, seconds for the lot); a
few representative ones run ``python -m oasisvq`` as a real process.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oasisvq import cli

from .conftest import SIZE, TINY_CONFIG, ellipse, error_line, oasisvq, write_pngs

pytestmark = pytest.mark.filterwarnings("ignore:skipped unreadable file")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, trained_run) -> dict[str, Path]:
    """Broken inputs of every kind, made once."""
    root = tmp_path_factory.mktemp("bad")
    d: dict[str, Path] = {"root": root}
    d["empty_png"] = root / "empty.png"
    d["empty_png"].write_bytes(b"")
    good = root / "good.png"
    Image.fromarray(ellipse(np.random.default_rng(0))).save(good)
    d["good_png"] = good
    d["corrupt_png"] = root / "corrupt.png"
    d["corrupt_png"].write_bytes(good.read_bytes()[:60])
    d["garbage_nii"] = root / "garbage.nii.gz"
    d["garbage_nii"].write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    d["text"] = root / "notes.txt"
    d["text"].write_text("hello")
    d["empty_dir"] = root / "empty_dir"
    d["empty_dir"].mkdir()
    # split folders whose train split holds one corrupt and one empty PNG among good ones
    d["mixed"] = write_pngs(root / "mixed", counts=(12, 4, 4))
    shutil.copy(d["corrupt_png"], d["mixed"] / "train" / "case_900_slice_0.png")
    shutil.copy(d["empty_png"], d["mixed"] / "train" / "case_901_slice_0.png")
    d["no_model"] = root / "run_without_model"
    (d["no_model"] / "checkpoints").mkdir(parents=True)
    (d["no_model"] / "config.json").write_text(json.dumps(TINY_CONFIG))
    d["a_file"] = root / "a_file"
    d["a_file"].write_text("I am a file, not a folder")
    d["bad_cfg"] = root / "bad.json"
    d["bad_cfg"].write_text(json.dumps({"model": {"downsample": 3}}))
    d["not_json"] = root / "not.json"
    d["not_json"].write_text("{model: ")
    d["run"] = trained_run
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OASISVQ_CACHE", str(tmp_path / "cache"))



# (case id, argv with {key} placeholders, text the error line must contain)
CASES = [
    # train
    ("train-missing-data", ["train", "--data", "{root}/nowhere", "--out", "{root}/o1", "--size", "32"], "nowhere"),
    ("train-empty-folder", ["train", "--data", "{empty_dir}", "--out", "{root}/o2", "--size", "32"], "empty_dir"),
    ("train-corrupt-png", ["train", "--data", "{mixed}", "--out", "{root}/o3", "--config", "{tiny}", "--size", "32",
                           "--epochs", "1", "--no-progress"], "case_90"),
    ("train-data-is-text", ["train", "--data", "{text}", "--out", "{root}/o4"], "notes.txt"),
    ("train-negative-size", ["train", "--data", "{mixed}", "--out", "{root}/o5", "--size", "-32"], "--size"),
    ("train-size-not-16x", ["train", "--data", "{mixed}", "--out", "{root}/o6", "--size", "40"], "size"),
    ("train-zero-epochs", ["train", "--data", "{mixed}", "--out", "{root}/o7", "--epochs", "0"], "--epochs"),
    ("train-bad-downsample", ["train", "--data", "{mixed}", "--out", "{root}/o8", "--downsample", "32"],
     "--downsample"),
    ("train-downsample-3", ["train", "--data", "{mixed}", "--out", "{root}/o9", "--config", "{bad_cfg}"],
     "model.downsample"),
    ("train-missing-config", ["train", "--data", "{mixed}", "--out", "{root}/o10", "--config", "{root}/no.json"],
     "no.json"),
    ("train-config-not-json", ["train", "--data", "{mixed}", "--out", "{root}/o11", "--config", "{not_json}"],
     "not.json"),
    ("train-batch-too-big", ["train", "--data", "{mixed}", "--out", "{root}/o12", "--config", "{tiny}", "--size",
                             "32", "--batch-size", "1000", "--skip-bad", "--no-progress"], "batch size 1000"),
    ("train-out-is-a-file", ["train", "--data", "{mixed}", "--out", "{a_file}", "--size", "32"], "a_file"),
    ("train-resume-nothing", ["train", "--out", "{root}/o13", "--resume"], "o13"),
    ("train-lr-text", ["train", "--data", "{mixed}", "--out", "{root}/o14", "--lr", "fast"], "--lr"),
    # evaluate
    ("evaluate-missing-run", ["evaluate", "{root}/norun"], "norun"),
    ("evaluate-run-without-model", ["evaluate", "{no_model}"], "no model checkpoint"),
    ("evaluate-missing-checkpoint", ["evaluate", "{run}", "--checkpoint", "{root}/x.safetensors"], "x.safetensors"),
    ("evaluate-missing-data", ["evaluate", "{run}", "--data", "{root}/nodata", "--no-progress"], "nodata"),
    ("evaluate-bad-split", ["evaluate", "{run}", "--split", "holdout"], "--split"),
    ("evaluate-out-is-a-file", ["evaluate", "{run}", "--out", "{a_file}", "--no-progress", "--device", "cpu"],
     "a_file"),
    # reconstruct
    ("reconstruct-missing-input", ["reconstruct", "{run}", "{root}/nothing.png", "--out", "{root}/r1"],
     "nothing.png"),
    ("reconstruct-empty-png", ["reconstruct", "{run}", "{empty_png}", "--out", "{root}/r2", "--no-progress"],
     "empty.png"),
    ("reconstruct-corrupt-png", ["reconstruct", "{run}", "{corrupt_png}", "--out", "{root}/r3", "--no-progress"],
     "corrupt.png"),
    ("reconstruct-garbage-volume", ["reconstruct", "{run}", "{garbage_nii}", "--out", "{root}/r4",
                                    "--no-progress"], "garbage.nii.gz"),
    ("reconstruct-text", ["reconstruct", "{run}", "{text}", "--out", "{root}/r5", "--no-progress"], "notes.txt"),
    ("reconstruct-no-model", ["reconstruct", "{no_model}", "{good_png}", "--out", "{root}/r6"], "no model"),
    ("reconstruct-out-is-a-file", ["reconstruct", "{run}", "{good_png}", "--out", "{a_file}", "--device", "cpu"],
     "a_file"),
    # sample
    ("sample-n-0", ["sample", "{run}", "-n", "0"], "-n"),
    ("sample-n-negative", ["sample", "{run}", "-n", "-3"], "-n"),
    ("sample-temperature-0", ["sample", "{run}", "--temperature", "0"], "--temperature"),
    ("sample-top-k-negative", ["sample", "{run}", "--top-k", "-1", "--device", "cpu"], "top_k"),
    ("sample-no-prior", ["sample", "{run}", "--prior", "pixelcnn", "--device", "cpu"], "pixelcnn"),
    ("sample-no-model", ["sample", "{no_model}", "--device", "cpu"], "prior"),
    ("sample-missing-run", ["sample", "{root}/norun", "--device", "cpu"], "norun"),
    ("sample-cond-unconditional", ["sample", "{run}", "--prior", "transformer", "--cond", "1", "--device", "cpu"],
     "unconditional"),
    ("sample-out-is-a-file", ["sample", "{run}", "--prior", "transformer", "-n", "1", "--out", "{a_file}",
                              "--device", "cpu", "--no-progress"], "a_file"),
    # train-prior (the run has a transformer prior, so the pixelcnn kind is free to be misconfigured)
    ("prior-missing-run", ["train-prior", "{root}/norun"], "norun"),
    ("prior-no-model", ["train-prior", "{no_model}", "--device", "cpu"], "no model checkpoint"),
    ("prior-resume-nothing", ["train-prior", "{run}", "--kind", "pixelcnn", "--resume"], "nothing to resume"),
    ("prior-even-kernel", ["train-prior", "{run}", "--kind", "pixelcnn", "--kernel", "4", "--device", "cpu"],
     "kernel"),
    ("prior-dropout", ["train-prior", "{run}", "--kind", "pixelcnn", "--dropout", "1.5", "--device", "cpu"],
     "dropout"),
    ("prior-heads", ["train-prior", "{run}", "--kind", "transformer", "--overwrite", "--width", "8", "--heads",
                     "3", "--device", "cpu"], "heads"),
    ("prior-zero-epochs", ["train-prior", "{run}", "--epochs", "0"], "--epochs"),
    ("prior-bad-kind", ["train-prior", "{run}", "--kind", "gan"], "--kind"),
    # data inspect
    ("inspect-missing", ["data", "inspect", "--no-progress", "{root}/nowhere"], "nowhere"),
    ("inspect-empty-folder", ["data", "inspect", "--no-progress", "{empty_dir}"], "empty_dir"),
    ("inspect-corrupt", ["data", "inspect", "--no-progress", "{mixed}", "--grid", "{root}/g.png"], "case_90"),
    ("inspect-garbage-volume", ["data", "inspect", "--no-progress", "{garbage_nii}", "--grid", "{root}/g.png"], "garbage.nii.gz"),
    ("inspect-size-0", ["data", "inspect", "--no-progress", "{mixed}", "--size", "0"], "--size"),
    ("inspect-size-40", ["data", "inspect", "--no-progress", "{mixed}", "--size", "40"], "size"),
    ("inspect-grid-is-a-folder", ["data", "inspect", "--no-progress", "{mixed}", "--skip-bad", "--grid", "{empty_dir}", "--size",
                                  "32"], "empty_dir"),
]


def _fill(argv: list[str], bad: dict[str, Path], tiny: Path) -> list[str]:
    values = {k: str(v) for k, v in bad.items()} | {"tiny": str(tiny)}
    return [a.format(**values) for a in argv]


@pytest.mark.parametrize("argv, needle", [(a, n) for _, a, n in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_clear_line(argv, needle, bad, tiny_config, capsys):
    before = sorted(p.relative_to(bad["run"]) for p in bad["run"].rglob("*"))
    try:
        code = cli.main(_fill(argv, bad, tiny_config))
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    line = error_line(err)
    assert needle in line, line
    # a failing command leaves the shared run as it was
    assert sorted(p.relative_to(bad["run"]) for p in bad["run"].rglob("*")) == before


@pytest.mark.parametrize("argv, needle", [
    (["train", "--data", "{root}/nowhere", "--out", "{root}/p1"], "nowhere"),
    (["sample", "{run}", "-n", "0"], "-n"),
    (["reconstruct", "{run}", "{corrupt_png}", "--out", "{root}/p2", "--no-progress", "--device", "cpu"],
     "corrupt.png"),
    (["data", "inspect", "--no-progress", "{garbage_nii}", "--grid", "{root}/g.png"], "garbage.nii.gz"),
], ids=["train", "sample", "reconstruct", "inspect"])
def test_bad_input_real_process(argv, needle, bad, tiny_config, tmp_path):
    p = oasisvq(*_fill(argv, bad, tiny_config), cache=tmp_path / "cache")
    assert p.returncode == 2, p.stderr
    assert needle in error_line(p.stderr)
    assert p.stdout == ""


def test_inspect_skip_bad_lists_unreadable_files(bad, tmp_path, capsys):
    code = cli.main(["data", "inspect", "--no-progress", str(bad["mixed"]), "--skip-bad", "--size", "32", "--grid",
                     str(tmp_path / "g.png"), "--cache-dir", str(tmp_path / "c")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    problems = " ".join(report["problems"])
    assert "case_900_slice_0.png" in problems and "case_901_slice_0.png" in problems
    assert report["slices"] == 20


def test_train_skip_bad_skips_and_names_the_files(bad, tiny_config, tmp_path):
    out = tmp_path / "run"
    p = oasisvq("train", "--data", bad["mixed"], "--out", out, "--config", tiny_config, "--size", SIZE,
                "--epochs", 1, "--no-progress", "--skip-bad", cache=tmp_path / "cache")
    assert p.returncode == 0, p.stderr
    warned = [ln for ln in p.stderr.splitlines() if ln.startswith("oasisvq: warning: skipped unreadable file:")]
    assert len(warned) == 2 and any("case_900" in w for w in warned) and any("case_901" in w for w in warned)
    assert (out / "checkpoints" / "best.safetensors").is_file()
