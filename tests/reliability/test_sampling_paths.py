"""Promise 7: sampling writes only inside its output folder and refuses names that would escape it.

Decisions (documented in ``sampling.sample``'s behaviour and checked here):
- ``prefix`` must be a plain file-name stem (letters, digits, ``_``, ``-``, ``.``; no ``/``, no ``..``, not
  absolute): anything else is refused before any file is written.
- An output folder that is itself a symlink is followed: the user named it, so the files land in its target
  (like any other tool writing into a symlinked folder), and nowhere else.
- A symlink *inside* the output folder under a name sampling would write (e.g. a planted
  ``sample_000.png -> ~/.bashrc``) is refused, so nothing is ever written through it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from oasisvq.errors import ConfigError
from oasisvq.sampling import sample

pytestmark = pytest.mark.filterwarnings("ignore:.*VQ-VAE changed")


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def run(tmp_path, trained_run) -> Path:
    r = tmp_path / "run"
    shutil.copytree(trained_run, r)
    return r


def _sample(run, out, **kw):
    return sample(run, "transformer", n=2, out=out, device="cpu", batch_size=2, progress=False, **kw)


@pytest.mark.parametrize("prefix", ["../x", "../../etc/x", "/tmp/abs", "a/b", "..", "", ".hidden", "x\\..\\y",
                                    "a\nb"])
def test_prefix_that_escapes_is_refused_before_writing(run, tmp_path, prefix):
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match="prefix"):
        _sample(run, tmp_path / "out", prefix=prefix)
    assert tree(tmp_path) == before


def test_writes_only_inside_out(run, tmp_path):
    before = tree(tmp_path)
    out = tmp_path / "out"
    info = _sample(run, out, prefix="brain.v1")
    new = tree(tmp_path) - before
    assert new == {"out", "out/brain.v1_000.png", "out/brain.v1_001.png", "out/samples_grid.png",
                   "out/samples.json"}
    assert info["files"] == ["brain.v1_000.png", "brain.v1_001.png"]


def test_symlinked_out_folder_is_followed_and_nothing_else_written(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "out"
    os.symlink(elsewhere, link)
    before = tree(tmp_path)
    _sample(run, link)
    names = {"sample_000.png", "sample_001.png", "samples_grid.png", "samples.json"}
    assert tree(tmp_path) - before == {f"elsewhere/{n}" for n in names}  # rglob does not enter the link
    assert link.is_symlink() and {p.name for p in link.iterdir()} == names
    assert not any(p.is_symlink() for p in elsewhere.iterdir())


def test_planted_symlink_inside_out_is_refused(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, out / "sample_001.png")
    with pytest.raises(ConfigError, match="escapes the output folder"):
        _sample(run, out)
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["sample_001.png"]
