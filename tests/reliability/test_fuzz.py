"""Promise 5 (fuzzed): the readers meet random bytes, truncated PNG/NIfTI files, forged headers and odd
shapes with either a valid result or ``DataError``, never another exception."""

from __future__ import annotations

import gzip
import io
import struct
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from oasisvq.config import DataConfig
from oasisvq.data import SliceSet, load_slices, load_volume, read_png
from oasisvq.errors import DataError

pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore:.*padded/resized")]

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


GOOD_PNG = _png(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8))


def _nifti(shape: tuple[int, ...], dtype=np.float32) -> bytes:
    data = np.random.default_rng(0).random(shape).astype(dtype) if shape and min(shape) > 0 else np.zeros(shape, dtype)
    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


GOOD_NII = _nifti((6, 5, 4))


def _expect_png(data: bytes, name: str = "x.png") -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(data)
        try:
            a = read_png(p)
        except DataError as e:
            assert str(p) in str(e)
            return
        assert a.dtype == np.uint8 and a.ndim == 2


def _expect_volume(data: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(data)
        try:
            v = load_volume(p)
        except DataError as e:
            assert str(p) in str(e)
            return
        assert v.ndim == 3 and v.dtype == np.float32 and np.isfinite(v).all()


@FUZZ
@given(st.binary(max_size=2048))
def test_read_png_random_bytes(data):
    _expect_png(data)


@FUZZ
@given(st.integers(0, len(GOOD_PNG)), st.binary(max_size=16))
def test_read_png_truncated_or_with_tail(cut, tail):
    _expect_png(GOOD_PNG[:cut] + tail)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


@FUZZ
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 4, 8, 16]),
       st.sampled_from([0, 2, 3, 4, 6, 7]), st.binary(max_size=256))
def test_read_png_forged_header(width, height, depth, colour, idat):
    """Valid signature and CRCs around an IHDR claiming any size/depth/colour type (decompression bombs too)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(idat)) + _chunk(b"IEND", b"")
    _expect_png(data)


@FUZZ
@given(st.binary(max_size=1024), st.sampled_from(["v.nii", "v.nii.gz", "v.mgz", "v.img"]))
def test_load_volume_random_bytes(data, name):
    if name == "v.nii.gz" and data[:1] == b"\x01":
        data = gzip.compress(data)  # sometimes a valid gzip stream around garbage
    _expect_volume(data, name)


@FUZZ
@given(st.integers(0, len(GOOD_NII)), st.sampled_from(["v.nii", "v.nii.gz"]))
def test_load_volume_truncated(cut, name):
    data = GOOD_NII[:cut]
    _expect_volume(gzip.compress(data) if name.endswith(".gz") else data, name)


@FUZZ
@given(st.lists(st.integers(0, 12), min_size=1, max_size=5),
       st.sampled_from([np.float32, np.int16, np.uint8, np.float64]),
       st.sampled_from([None, "nan", "inf", "const"]))
def test_load_volume_odd_shapes_and_values(shape, dtype, fill):
    shape = tuple(shape)
    data = np.random.default_rng(1).random(shape).astype(np.float64) * 100
    if fill == "nan" and data.size:
        data.flat[0] = np.nan
    elif fill == "inf" and data.size:
        data.flat[-1] = np.inf
    elif fill == "const":
        data[...] = 7
    if np.dtype(dtype).kind != "f":
        data = np.nan_to_num(data, posinf=0)
    _expect_volume(nib.Nifti1Image(data.astype(dtype), np.eye(4)).to_bytes(), "v.nii")


FILES = st.one_of(
    st.tuples(st.just("png"), st.sampled_from(["L", "RGB", "RGBA", "I;16", "1", "P"]),
              st.integers(1, 80), st.integers(1, 80)),
    st.tuples(st.just("bytes"), st.binary(max_size=300)),
    st.tuples(st.just("nii"), st.lists(st.integers(0, 10), min_size=2, max_size=4)),
)


def _write(folder: Path, i: int, spec) -> None:
    if spec[0] == "png":
        _, mode, h, w = spec
        arr = np.random.default_rng(i).integers(0, 255, (h, w)).astype(np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / f"case_{i}_slice_0.png")
    elif spec[0] == "bytes":
        (folder / f"case_{i}_slice_0.png").write_bytes(spec[1])
    else:
        data = np.random.default_rng(i).random(tuple(spec[1])).astype(np.float32)
        (folder / f"OAS1_{i:04d}.nii").write_bytes(nib.Nifti1Image(data, np.eye(4)).to_bytes())


@FUZZ
@given(st.lists(FILES, min_size=0, max_size=4), st.booleans(), st.booleans())
def test_load_slices_any_folder(specs, skip_bad, split_layout):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        folder = root / "train" if split_layout else root
        folder.mkdir(parents=True)
        for i, spec in enumerate(specs):
            _write(folder, i, spec)
        try:
            ss = load_slices(DataConfig(paths=[str(root)], size=32), cache_dir=Path(d) / "cache",
                             skip_bad=skip_bad, progress=False)
        except DataError:
            return
        assert isinstance(ss, SliceSet) and len(ss) > 0 and ss.shape == (32, 32)
