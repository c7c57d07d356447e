"""The data layer: every layout, subject-level splits, the cache, and clear errors for bad input."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from oasisvq.cli import main
from oasisvq.config import DataConfig
from oasisvq.data import (
    SliceSet,
    assign_splits,
    discover,
    inspect,
    load_slices,
    load_volume,
    png_levels,
    slice_volume,
    subject_of,
    tilt_volume,
    tilted_slices,
)
from oasisvq.errors import DataError

from .conftest import shared


def _cfg(*paths, **kw) -> DataConfig:
    return DataConfig(paths=[str(p) for p in paths], **kw)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _head_volume(shape=(40, 48, 36), seed=0):
    """An ellipsoid 'head' with noise, float32."""
    g = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = (zz**2 / 0.8 + yy**2 / 0.9 + xx**2 / 0.7) < 1
    return (head * (100 + 20 * g.standard_normal(shape))).astype(np.float32)


# ---------------------------------------------------------------------------------------------- real data


def test_keras_sample_pairs_images_with_masks(cache_dir):
    root = shared("keras_png_slices_sample")
    d = discover(root)
    assert d.layout == "keras"
    assert {(f.subject, f.split, f.mask.name) for f in d.files} == {
        ("case_001", "train", "seg_001_slice_0.nii.png"), ("case_441", "test", "seg_441_slice_0.nii.png")}
    ss = load_slices(_cfg(root), cache_dir=cache_dir)
    assert len(ss) == 2 and ss.shape == (256, 256) and ss.has_masks
    test = ss.split("test")
    assert list(test.subjects) == ["case_441"]
    raw = np.asarray(Image.open(root / "keras_png_slices_test" / "case_441_slice_0.nii.png"))
    assert np.array_equal(test.images[0], raw)  # 256x256 official slices pass through untouched
    labels = test.masks[0]
    seg = np.asarray(Image.open(root / "keras_png_slices_seg_test" / "seg_441_slice_0.nii.png"))
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.array_equal(labels * 85, seg)
    with pytest.raises(DataError, match="'validate' split has no slices"):
        ss.split("validate")
    assert np.isnan(ss.position).all()  # one slice per subject here: no level to tell


def test_real_volumes_slice_by_subject(cache_dir):
    root = shared("oasis1_mni_volumes")
    ss = load_slices(_cfg(root), cache_dir=cache_dir)
    per_subject = {s: int((ss.subjects == s).sum()) for s in set(ss.subjects)}
    assert len(per_subject) == 10 and all(s.startswith("OAS1_") for s in per_subject)
    # ~170 head-bearing axial slices of 192 per volume (shared data README)
    assert all(150 <= n <= 192 for n in per_subject.values()), per_subject
    assert ss.shape == (256, 256)
    imgs = ss.uint8(np.arange(0, len(ss), 50))
    assert imgs.dtype == np.uint8 and imgs.max() == 255 and imgs.min() == 0
    # splits by subject: 8 / 1 / 1, no subject in two splits
    summary = ss.summary()
    assert (summary["train"]["subjects"], summary["validate"]["subjects"], summary["test"]["subjects"]) == (8, 1, 1)
    for s in per_subject:
        assert len(set(ss.splits[ss.subjects == s])) == 1
    # positions run from 0 (first head-bearing slice) to 1 within each volume
    first = ss.subjects == ss.subjects[0]
    assert ss.position[first].min() == 0 and ss.position[first].max() == 1


def test_t88_split_folders_keep_their_split(cache_dir):
    root = shared("oasis1_t88_axial")
    ss = load_slices(_cfg(root), cache_dir=cache_dir)
    assert ss.summary() == {"train": {"slices": 120, "subjects": 120}, "validate": {"slices": 20, "subjects": 20},
                            "test": {"slices": 20, "subjects": 20}}
    assert np.isnan(ss.position).all()  # names carry no slice number


# -------------------------------------------------------------------------------------- orientation, ids


def test_reorientation_uses_the_affine(tmp_path, cache_dir):
    """The same anatomy stored LAS and RAS gives the same slices: a marker at the front ends up right."""
    vol = np.zeros((40, 48, 36), np.float32)
    vol[10:30, 8:40, 5:30] = 100  # head
    vol[18:22, 36:40, 15:20] = 400  # marker at the front (high y, anterior)
    ras = np.diag([1.0, 1, 1, 1])
    las = np.diag([-1.0, 1, 1, 1])
    nib.save(nib.Nifti1Image(vol, ras), tmp_path / "sub-0001_ras.nii.gz")
    nib.save(nib.Nifti1Image(vol[::-1].copy(), las), tmp_path / "sub-0002_las.nii.gz")
    ss = load_slices(_cfg(tmp_path, size=64, split_fractions=(1.0, 0.0, 0.0)), cache_dir=cache_dir)
    a = ss.uint8(np.flatnonzero(ss.subjects == "OAS1_0001"))
    b = ss.uint8(np.flatnonzero(ss.subjects == "OAS1_0002"))
    assert np.array_equal(a, b)
    brightest = np.unravel_index(np.argmax(a.max(axis=0)), a.shape[1:])
    assert brightest[1] > 32  # columns run back -> front: the marker is on the right half


@pytest.mark.parametrize("name,subject", [
    ("case_441_slice_0.nii.png", "case_441"), ("seg_441_slice_3.nii.png", "case_441"),
    ("OAS1_0441_MR1_mpr_n4_anon_111_t88_masked_gfc.img", "OAS1_0441"),
    ("sub-0441_T1w_jdac.nii.gz", "OAS1_0441"), ("train-NAL013_t88_tra.png", "train-NAL013_t88_tra"),
])
def test_subject_ids_from_file_names(name, subject):
    assert subject_of(name) == subject


def test_splits_are_by_subject_and_deterministic():
    from oasisvq.data import SourceFile

    files = [SourceFile(f"s{i}_{k}.png", "png", None, f"s{i}") for i in range(20) for k in range(5)]
    a = assign_splits(files, (0.8, 0.1, 0.1), seed=0)
    assert a == assign_splits(files, (0.8, 0.1, 0.1), seed=0)
    assert a != assign_splits(files, (0.8, 0.1, 0.1), seed=1)
    by_subject = {}
    for f, s in zip(files, a):
        by_subject.setdefault(f.subject, set()).add(s)
    assert all(len(v) == 1 for v in by_subject.values())
    counts = {s: sum(1 for v in by_subject.values() if s in v) for s in ("train", "validate", "test")}
    assert counts == {"train": 16, "validate": 2, "test": 2}


# -------------------------------------------------------------------------------------------- PNG levels


def _keras_set(root, cases):
    """A keras-layout folder: ``cases`` maps case number -> (split, slice count)."""
    for case, (split, n) in cases.items():
        for k in range(n):
            _png(root / f"keras_png_slices_{split}" / f"case_{case:03d}_slice_{k}.nii.png", np.full((16, 16), 10 * k))


def test_nearest_levels_picks_the_first_subjects_slices():
    index = {"subjects": ["b", "a", "b", "a", "b"], "sources": ["x"] * 5, "slices": list(range(5)),
             "splits": ["train"] * 5, "positions": [0.1, 0.3, 0.5, 0.62, 0.9]}
    slices = SliceSet(np.zeros((5, 2, 2), np.uint8), index)
    assert slices.nearest_levels([0.0, 0.6, 0.7, 1.0]) == [0, 2, 2, 4]  # subject "b" only: not 3 at 0.6 or 0.7
    assert slices.split("train").subset([1, 3]).nearest_levels([0.2, 0.7]) == [0, 1]  # positions in the view


def test_keras_png_slices_carry_their_level(tmp_path, cache_dir):
    _keras_set(tmp_path, {1: ("train", 5), 2: ("test", 5), 3: ("validate", 1)})
    ss = load_slices(_cfg(tmp_path, size=16), cache_dir=cache_dir)
    for case in ("case_001", "case_002"):
        sel = ss.subjects == case
        order = np.argsort(ss.slice_numbers[sel])
        assert ss.position[sel][order].tolist() == [0, 0.25, 0.5, 0.75, 1]
        # the level belongs to the slice it came from
        assert (ss.images[sel][order][:, 8, 8] == 10 * np.arange(5)).all()
    assert np.isnan(ss.position[ss.subjects == "case_003"]).all()  # a lone slice has no known level
    assert inspect(tmp_path, DataConfig(size=16), cache_dir=cache_dir)["slices_with_position"] == 10


def test_png_levels_across_splits_and_layouts():
    from oasisvq.data import SourceFile

    # one subject's slices split over two folders count together; unnumbered names and volumes stay NaN
    files = [SourceFile(Path(f"case_7_slice_{k}.nii.png"), "png", s, "case_7") for k, s in
             [(2, "test"), (0, "train"), (1, "train")]]
    files += [SourceFile(Path("train-NAL013_t88_tra.png"), "png", "train", "train-NAL013_t88_tra"),
              SourceFile(Path("sub-0001_slice_3.nii.gz"), "volume", None, "OAS1_0001")]
    assert png_levels(files)[:3] == [1.0, 0.0, 0.5]
    assert np.isnan(png_levels(files)[3:]).all()
    # missing slices never push a level past 1
    gappy = [SourceFile(Path(f"a_slice_{k}.png"), "png", None, "a") for k in (0, 5, 9)]
    assert png_levels(gappy) == [0.0, 5 / 9, 1.0]


def test_t88_like_names_keep_nan(tmp_path, cache_dir):
    for split in ("train", "validate", "test"):
        for code in ("NAL013", "YAL020"):
            _png(tmp_path / split / f"{split}-{code}_t88_tra.png", np.full((16, 16), 50))
    ss = load_slices(_cfg(tmp_path, size=16), cache_dir=cache_dir)
    assert len(ss) == 6 and np.isnan(ss.position).all()
    assert inspect(tmp_path, DataConfig(size=16), cache_dir=cache_dir)["slices_with_position"] == 0


def test_cache_without_levels_is_rebuilt(tmp_path, cache_dir, monkeypatch):
    """A cache written before PNG levels existed (version 1, NaN positions) is not reused."""
    from oasisvq import data

    _keras_set(tmp_path, {1: ("train", 3)})
    with monkeypatch.context() as m:
        m.setattr(data, "CACHE_VERSION", 1)
        m.setattr(data, "png_levels", lambda files: [np.nan] * len(files))
        old = load_slices(_cfg(tmp_path, size=16), cache_dir=cache_dir)
    assert np.isnan(old.position).all()
    new = load_slices(_cfg(tmp_path, size=16), cache_dir=cache_dir)
    assert len(list(cache_dir.iterdir())) == 2 and new.index["version"] == data.CACHE_VERSION
    assert sorted(new.position.tolist()) == [0, 0.5, 1]
    again = load_slices(_cfg(tmp_path, size=16), cache_dir=cache_dir)  # and the levels survive the cache
    assert isinstance(again._images, np.memmap) and sorted(again.position.tolist()) == [0, 0.5, 1]


# ------------------------------------------------------------------------------------------ tilted copies


def test_tilt_volume_turns_about_the_named_axes_and_scales_about_the_centre():
    vol = np.zeros((21, 21, 21), np.float32)
    vol[15, 10, 10] = 1.0  # 5 voxels right of the centre (x)
    assert np.allclose(tilt_volume(vol, (0, 0, 0)), vol, atol=1e-6)
    where = lambda v: tuple(int(i) for i in np.unravel_index(np.argmax(v), v.shape))
    assert where(tilt_volume(vol, (0, 0, 90))) == (10, 15, 10)  # a quarter turn about "up" takes right to front
    assert where(tilt_volume(vol, (0, -90, 0))) == (10, 10, 15)  # about back-front, right goes up
    assert where(tilt_volume(vol, (90, 0, 0))) == (15, 10, 10)  # the left-right axis itself stays put
    vol[15, 10, 10], vol[12, 10, 10] = 0.0, 1.0  # 2 voxels right; twice the size puts it 4 right
    assert where(tilt_volume(vol, (0, 0, 0), scale=2.0)) == (14, 10, 10)


def test_tilted_slices_are_new_seeded_cuts_of_the_training_volumes(tmp_path):
    for i in range(5):
        nib.save(nib.Nifti1Image(_head_volume(seed=i), np.eye(4)), tmp_path / f"sub-{i:04d}.nii.gz")
    cfg = _cfg(tmp_path, size=64, split_fractions=(0.6, 0.2, 0.2))
    copies = list(tilted_slices(cfg, copies=2, seed=3, progress=False))
    assert len(copies) == 3 * 2  # three training subjects, two copies each
    for images, levels in copies:
        assert images.dtype == np.uint8 and images.shape[1:] == (64, 64) and len(images) == len(levels)
        assert levels.min() == 0 and levels.max() == 1  # levels span each tilted head as slice_volume's do
    again = list(tilted_slices(cfg, copies=2, seed=3, progress=False))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(copies, again))
    other = list(tilted_slices(cfg, copies=2, seed=4, progress=False))
    assert not any(a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) for a, b in zip(copies, other))
    ss = load_slices(cfg, cache_dir=tmp_path / "cache", progress=False)
    originals = ss.split("train").images
    assert not any(np.array_equal(t, o) for t in copies[0][0][::8] for o in originals)


def test_tilted_slices_refuse_2d_slices(tmp_path):
    for i in range(3):
        _png(tmp_path / f"case_{i:03d}_slice_0.nii.png", np.full((16, 16), 100, np.uint8))
    with pytest.raises(DataError, match=r"case_\d+_slice_0\.nii\.png: tilted copies are made from 3D volumes"):
        list(tilted_slices(_cfg(tmp_path, size=16), copies=1))


# ------------------------------------------------------------------------------------------------- cache


def test_cache_round_trip_and_invalidation(tmp_path, cache_dir):
    for i in range(6):
        nib.save(nib.Nifti1Image(_head_volume(seed=i), np.eye(4)), tmp_path / f"sub-{i:04d}.nii.gz")
    cfg = _cfg(tmp_path, size=64)
    first = load_slices(cfg, cache_dir=cache_dir)
    entries = sorted(p.name for p in cache_dir.iterdir())
    assert len(entries) == 1 and not any(p.name.startswith(".tmp") for p in cache_dir.iterdir())
    second = load_slices(cfg, cache_dir=cache_dir)
    assert isinstance(second._images, np.memmap)
    assert first.images.tobytes() == second.images.tobytes()
    assert list(first.subjects) == list(second.subjects) and list(first.splits) == list(second.splits)
    # the cache holds exactly what a fresh read produces
    direct = np.concatenate([slice_volume(load_volume(tmp_path / f"sub-{i:04d}.nii.gz"), cfg)[0] for i in range(6)])
    assert np.array_equal(np.sort(direct.reshape(len(direct), -1), 0), np.sort(first.images.reshape(len(first), -1), 0))
    # a changed setting or a changed file makes a new entry
    load_slices(_cfg(tmp_path, size=32), cache_dir=cache_dir)
    assert len(list(cache_dir.iterdir())) == 2
    nib.save(nib.Nifti1Image(_head_volume(seed=99), np.eye(4)), tmp_path / "sub-0000.nii.gz")
    load_slices(cfg, cache_dir=cache_dir)
    assert len(list(cache_dir.iterdir())) == 3


def test_failed_build_leaves_no_cache(tmp_path, cache_dir):
    for i in range(3):
        _png(tmp_path / "train" / f"case_{i}_slice_0.png", np.full((64, 64), 100))
    (tmp_path / "train" / "case_9_slice_0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="case_9_slice_0.png: not a readable image"):
        load_slices(_cfg(tmp_path, size=64), cache_dir=cache_dir)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
    ss = load_slices(_cfg(tmp_path, size=64), cache_dir=cache_dir, skip_bad=True)
    assert len(ss) == 3 and any("case_9" in s for s in ss.index["skipped"])
    # the cache built with skip_bad does not serve a later call without it
    with pytest.raises(DataError, match=r"case_9_slice_0.png: not a readable image .*1 unreadable file.*--skip-bad"):
        load_slices(_cfg(tmp_path, size=64), cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope: no such file or directory"):
        discover(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no PNG slices or volumes found"):
        discover(tmp_path)


def test_truncated_png(tmp_path, cache_dir):
    _png(tmp_path / "train" / "a.png", np.full((64, 64), 7))
    full = (tmp_path / "train" / "a.png").read_bytes()
    (tmp_path / "train" / "a.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"a\.png: not a readable image"):
        load_slices(_cfg(tmp_path, size=64), cache_dir=cache_dir)


def test_unreadable_nifti(tmp_path, cache_dir):
    (tmp_path / "sub-0001.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(DataError, match="sub-0001.nii.gz: nibabel cannot read this volume"):
        load_slices(_cfg(tmp_path), cache_dir=cache_dir)


def test_4d_volume_refused(tmp_path, cache_dir):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), tmp_path / "sub-0001.nii.gz")
    with pytest.raises(DataError, match=r"sub-0001.nii.gz: a 4D volume of shape \(8, 8, 8, 3\)"):
        load_slices(_cfg(tmp_path), cache_dir=cache_dir)


def test_mixed_sizes_are_resized_with_a_warning(tmp_path, cache_dir):
    _png(tmp_path / "train" / "case_1_slice_0.png", np.full((64, 64), 200))
    _png(tmp_path / "train" / "case_2_slice_0.png", np.full((96, 80), 200))
    with pytest.warns(UserWarning, match="1 slice\\(s\\) were not 64x64"):
        ss = load_slices(_cfg(tmp_path, size=64), cache_dir=cache_dir)
    assert ss.shape == (64, 64) and len(ss) == 2


def test_empty_split_is_reported(tmp_path, cache_dir):
    _png(tmp_path / "train" / "case_1_slice_0.png", np.full((64, 64), 200))
    (tmp_path / "test").mkdir()
    ss = load_slices(_cfg(tmp_path, size=64), cache_dir=cache_dir)
    with pytest.raises(DataError, match="'test' split has no slices"):
        ss.split("test")


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    code = main(["data", "inspect", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("oasisvq: error:") and "missing" in err[0]


def test_inspect_reports_and_writes_grid(tmp_path, cache_dir):
    for i in range(5):
        nib.save(nib.Nifti1Image(_head_volume(seed=i), np.eye(4)), tmp_path / f"sub-{i:04d}.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = inspect(tmp_path, DataConfig(size=64), grid_png=tmp_path / "grid.png", cache_dir=cache_dir)
    assert r["layout"] == "volumes" and r["subjects"] == 5 and r["shape"] == [64, 64]
    assert sum(v["subjects"] for v in r["splits"].values()) == 5 and r["problems"] == []
    assert Image.open(tmp_path / "grid.png").size[0] > 100
