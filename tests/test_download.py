"""OASIS-1 download (resume, retries, checks, safe unpacking) and prepare, against a local HTTP server."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from oasisvq import download as dl
from oasisvq.config import DataConfig
from oasisvq.data import load_slices
from oasisvq.errors import DataError, OasisVQError

SHAPE = (32, 40, 24)
# session -> (first, last+1) axial slice holding head, disc, has FSL segmentation
SESSIONS = {
    "OAS1_0001_MR1": ((4, 20), 1, True),
    "OAS1_0002_MR1": ((6, 18), 1, True),
    "OAS1_0003_MR1": ((3, 21), 1, False),
    "OAS1_0004_MR1": ((5, 15), 2, True),
    "OAS1_0002_MR2": ((2, 22), 2, True),  # a second session: not used, the subject keeps MR1
}
AGES = {"OAS1_0001_MR1": "74", "OAS1_0002_MR1": "55", "OAS1_0003_MR1": "73", "OAS1_0004_MR1": "28"}
DISC1, DISC2, DISC9 = dl.disc_name(1), dl.disc_name(2), dl.disc_name(9)


def _save_analyze(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.AnalyzeImage(arr, np.eye(4)), str(path))


def _write_session(disc_dir: Path, session: str, zr: tuple[int, int], seg: bool) -> None:
    base = disc_dir / session
    vol = np.zeros(SHAPE, np.float32)
    ramp = np.linspace(0.2, 1.0, 16, dtype=np.float32)[:, None, None]
    vol[8:24, 10:30, zr[0]:zr[1]] = ramp + 0.01 * (zr[0] + np.arange(zr[1] - zr[0]))
    stem = f"{session}_mpr_n4_anon_111_t88"
    _save_analyze(base / "PROCESSED/MPRAGE/T88_111" / f"{stem}_masked_gfc.img", vol)
    _save_analyze(base / "PROCESSED/MPRAGE/T88_111" / f"{stem}_gfc.img", vol * 2)
    if seg:
        lab = np.zeros(SHAPE, np.uint8)
        lab[8:24, 10:30, zr[0]:zr[1]] = 1
        lab[12:20, 10:30, zr[0]:zr[1]] = 2
        lab[14:18, 14:26, zr[0]:zr[1]] = 3
        _save_analyze(base / "FSL_SEG" / f"{stem}_masked_gfc_fseg.img", lab)


def _tar_gz(folder: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buf.getvalue()


def _malicious_tar(tag: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, data=b"x", **kw):
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)

        add("disc9/ok.txt", b"fine")
        add("../evil")
        add(f"/tmp/oasisvq-evil-{tag}")
        add("disc9/../../evil2")
        add("disc9/abs_link", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("disc9/up_link", type=tarfile.SYMTYPE, linkname="../../outside")
        add("disc9/hard_link", type=tarfile.LNKTYPE, linkname="../outside")
        add("disc9/inner_link", type=tarfile.SYMTYPE, linkname="ok.txt")
        add("disc9/device", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("disc9/fifo", type=tarfile.FIFOTYPE)
    return buf.getvalue()


@pytest.fixture(scope="module")
def oasis(tmp_path_factory):
    """The unpacked OASIS-1 tree (with its demographics table) and the archives served for it."""
    root = tmp_path_factory.mktemp("oasis")
    for session, (zr, disc, seg) in SESSIONS.items():
        _write_session(root / f"disc{disc}", session, zr, seg)
    rows = [["ID", "M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF", "Delay"]]
    rows += [[s, "F", "R", a, "2", "3", "29", "0", "1344", "0.743", "1.306", "N/A"] for s, a in AGES.items()]
    table = io.StringIO()
    csv.writer(table).writerows(rows)
    (root / dl.DEMOGRAPHICS).write_text(table.getvalue())
    files = {DISC1: _tar_gz(root / "disc1", "disc1"), DISC2: _tar_gz(root / "disc2", "disc2"),
             DISC9: _malicious_tar(uuid.uuid4().hex), dl.DEMOGRAPHICS: table.getvalue().encode()}
    return root, files


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        st = self.server.state
        name = self.path.strip("/").split("/")[-1]
        rng = self.headers.get("Range")
        st["log"].append((name, rng))
        if st["fail"] > 0:
            st["fail"] -= 1
            self.send_error(503)
            return
        if name not in st["files"]:
            self.send_error(404)
            return
        data = st["files"][name]
        total = len(data) + st["lie_extra"]
        start = 0
        if rng and not st["ignore_range"]:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(total - start))
        self.send_header("Content-Type", "application/x-gzip")
        self.end_headers()
        body = data[start:]
        if st["drop_after"] is not None:
            body, st["drop_after"] = body[:st["drop_after"]], None
        self.wfile.write(body)


@pytest.fixture
def server(oasis, monkeypatch):
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    monkeypatch.setattr(dl, "RETRIES", 2)
    monkeypatch.setattr(dl, "TIMEOUT", (2.0, 2.0))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = {"files": dict(oasis[1]), "log": [], "fail": 0, "lie_extra": 0, "ignore_range": False,
                   "drop_after": None}
    httpd.state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/data/"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _get(srv, out: Path, **kw):
    kw.setdefault("discs", [1])
    kw.setdefault("checksums", {})
    return dl.download_oasis1(out, accept_terms=True, base_url=srv["url"], progress=False, **kw)


# ------------------------------------------------------------------------------------------------ download


def test_terms_gate_refuses_and_downloads_nothing(server, tmp_path, capsys):
    with pytest.raises(dl.TermsNotAccepted) as e:
        dl.download_oasis1(tmp_path / "d", discs=[1], base_url=server["url"], progress=False)
    assert isinstance(e.value, OasisVQError)
    assert dl.OASIS_ACKNOWLEDGEMENT in str(e.value) and "oasis-brains.org" in str(e.value)
    assert dl.OASIS_ACKNOWLEDGEMENT in capsys.readouterr().err
    assert server["log"] == []
    assert not (tmp_path / "d" / DISC1).exists()


def test_download_verifies_records_unpacks_and_rerun_skips(server, oasis, tmp_path):
    files, out = oasis[1], tmp_path / "d"
    rep = _get(server, out, discs=[1, 2], checksums={DISC1: _md5(files[DISC1])})
    assert {rep["files"][n]["status"] for n in (DISC1, DISC2)} == {"downloaded"}
    assert rep["unpacked"] == [1, 2] and rep["skipped_members"] == {DISC1: [], DISC2: []}
    for name in (DISC1, DISC2, dl.DEMOGRAPHICS):
        assert (out / name).read_bytes() == files[name]
    recorded = __import__("json").loads((out / "checksums.json").read_text())
    assert recorded[DISC1]["md5"] == _md5(files[DISC1]) and recorded[DISC2]["md5"] == _md5(files[DISC2])
    assert (out / "disc1/OAS1_0001_MR1/FSL_SEG/OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc_fseg.img").is_file()
    assert (out / "disc2/OAS1_0004_MR1/PROCESSED/MPRAGE/T88_111").is_dir()
    assert not list(out.glob("*.part"))
    n_requests = len(server["log"])
    rep2 = _get(server, out, discs=[1, 2])
    assert len(server["log"]) == n_requests  # nothing fetched again
    assert rep2["already_unpacked"] == [1, 2] and rep2["unpacked"] == []
    assert rep2["files"][DISC1]["status"] == "verified"
    # a completed file that no longer matches its recorded MD5 is refused
    (out / DISC2).write_bytes(files[DISC2][:-1] + bytes([files[DISC2][-1] ^ 1]))
    with pytest.raises(DataError, match=DISC2):
        _get(server, out, discs=[2])


def test_resume_from_partial_file_uses_range(server, oasis, tmp_path, monkeypatch):
    data, out = oasis[1][DISC1], tmp_path / "d"
    out.mkdir()
    k = len(data) // 3
    (out / (DISC1 + ".part")).write_bytes(data[:k])
    monkeypatch.setenv(dl.URL_ENV, server["url"])  # the environment names the server
    rep = dl.download_oasis1(out, discs=[1], accept_terms=True, progress=False, checksums={DISC1: _md5(data)})
    assert (DISC1, f"bytes={k}-") in server["log"]
    assert rep["files"][DISC1]["status"] == "resumed"
    assert (out / DISC1).read_bytes() == data


def test_dropped_connection_is_retried_from_its_offset(server, oasis, tmp_path):
    data, k = oasis[1][DISC1], 5000
    server["drop_after"] = k
    _get(server, tmp_path / "d", checksums={DISC1: _md5(data)})
    disc_requests = [r for n, r in server["log"] if n == DISC1]
    assert disc_requests == [None, f"bytes={k}-"]
    assert (tmp_path / "d" / DISC1).read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server, oasis, tmp_path):
    data, out = oasis[1][DISC1], tmp_path / "d"
    out.mkdir()
    (out / (DISC1 + ".part")).write_bytes(b"junk" * 100)  # not even a prefix of the file
    server["ignore_range"] = True
    _get(server, out)
    assert (DISC1, "bytes=400-") in server["log"]
    assert (out / DISC1).read_bytes() == data


def test_5xx_is_retried(server, oasis, tmp_path):
    server["fail"] = 2
    _get(server, tmp_path / "d")
    assert [n for n, _ in server["log"]].count(DISC1) == 3
    assert (tmp_path / "d" / DISC1).read_bytes() == oasis[1][DISC1]


def test_wrong_checksum_is_not_accepted(server, oasis, tmp_path):
    out = tmp_path / "d"
    with pytest.raises(DataError) as e:
        _get(server, out, checksums={DISC1: "0" * 32})
    msg = str(e.value)
    assert DISC1 in msg and "0" * 32 in msg and _md5(oasis[1][DISC1]) in msg and "deleted" in msg
    assert not (out / DISC1).exists() and not (out / (DISC1 + ".part")).exists()
    assert not (out / "checksums.json").exists()


def test_wrong_size_is_not_accepted(server, oasis, tmp_path):
    out, n = tmp_path / "d", len(oasis[1][DISC1])
    server["lie_extra"] = 100  # the server announces 100 bytes more than it sends
    with pytest.raises(DataError) as e:
        _get(server, out)
    msg = str(e.value)
    assert DISC1 in msg and f"expected {n + 100} bytes, got {n}" in msg and "kept" in msg
    assert not (out / DISC1).exists()
    assert (out / (DISC1 + ".part")).stat().st_size == n  # kept for a later resume
    assert len(server["log"]) == dl.RETRIES + 1


@pytest.mark.parametrize("data_filter", [True, False], ids=["data_filter", "manual"])
def test_malicious_archive_extracts_nothing_outside(server, oasis, tmp_path, monkeypatch, data_filter):
    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile.data_filter")
    out = tmp_path / "a" / "d"
    rep = _get(server, out, discs=[9])
    skipped = rep["skipped_members"][DISC9]
    names = {s.split(":")[0] for s in skipped}
    tag = next(n for n in names if n.startswith("/tmp/"))
    assert names == {"../evil", tag, "disc9/../../evil2", "disc9/abs_link", "disc9/up_link",
                     "disc9/hard_link", "disc9/device", "disc9/fifo"}
    assert (out / "disc9/ok.txt").read_bytes() == b"fine"
    assert (out / "disc9/inner_link").resolve() == (out / "disc9/ok.txt").resolve()
    assert not Path(tag).exists() and not (out / tag.lstrip("/")).exists()
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil2").exists()
    assert sorted(p.name for p in (out / "disc9").iterdir()) == ["inner_link", "ok.txt"]


# ------------------------------------------------------------------------------------------------- prepare


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def test_prepare_writes_pngs_masks_split_and_subjects(oasis, tmp_path):
    src, out = oasis[0], tmp_path / "png"
    rep = dl.prepare_oasis1(src, out, size=32, with_masks=True, progress=False)
    expected = {s.split("_")[1]: zr[1] - zr[0] for s, (zr, _, _) in SESSIONS.items() if s.endswith("MR1")}
    assert rep["subjects"] == 4 and rep["written"] == 4 and rep["skipped"] == 0
    assert rep["slices"] == sum(expected.values()) and rep["without_masks"] == ["OAS1_0003_MR1"]
    per_split = {}
    for split in ("train", "validate", "test"):
        imgs = _pngs(out / f"keras_png_slices_{split}")
        per_split[split] = {p.name.split("_")[1] for p in imgs}
        for p in imgs:
            with Image.open(p) as im:
                assert im.size == (32, 32) and im.mode == "L"
        for m in _pngs(out / f"keras_png_slices_seg_{split}"):
            assert (out / f"keras_png_slices_{split}" / m.name.replace("seg_", "case_")).is_file()
            values = set(np.unique(np.asarray(Image.open(m))).tolist())
            assert values <= {0, 85, 170, 255}
    all_imgs = [p for s in ("train", "validate", "test") for p in _pngs(out / f"keras_png_slices_{s}")]
    counts = {n: sum(p.name.startswith(f"case_{n}_") for p in all_imgs) for n in expected}
    assert counts == expected  # MR2 of subject 0002 is not mixed in
    assert sorted(p.name for p in all_imgs if p.name.startswith("case_0004_")) == sorted(
        f"case_0004_slice_{z}.nii.png" for z in range(5, 15))
    # subject-level split: every subject in exactly one split, every split used
    assert all(per_split.values())
    assert sum(len(v) for v in per_split.values()) == len(set().union(*per_split.values())) == 4
    segs = [p for s in ("train", "validate", "test") for p in _pngs(out / f"keras_png_slices_seg_{s}")]
    assert len(segs) == sum(v for k, v in expected.items() if k != "0003")
    assert {170, 255} <= set(np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in segs])))
    with open(out / "subjects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["session"]: r["Age"] for r in rows} == AGES
    assert {r["subject"] for r in rows} == {f"case_{n}" for n in expected}
    assert all(int(r["slices"]) == expected[r["subject"][5:]] for r in rows)
    # the data layer reads it back as the keras layout, with masks, one subject id per subject
    ss = load_slices(DataConfig(paths=[str(out)], size=32), cache_dir=tmp_path / "cache", progress=False)
    assert len(ss) == sum(expected.values()) and ss.has_masks and len(set(ss.subjects)) == 4
    assert ss.masks.max() == 3
    # a second run writes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    rep2 = dl.prepare_oasis1(src, out, size=32, with_masks=True, progress=False)
    assert rep2["written"] == 0 and rep2["skipped"] == 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    # a missing PNG makes just its subject be written again; other settings are refused
    all_imgs[0].unlink()
    assert dl.prepare_oasis1(src, out, size=32, with_masks=True, progress=False)["written"] == 1
    assert all_imgs[0].is_file()
    with pytest.raises(OasisVQError, match="another output folder"):
        dl.prepare_oasis1(src, out, size=48, progress=False)


def test_prepare_cache_format(oasis, tmp_path):
    rep = dl.prepare_oasis1(oasis[0], tmp_path / "cache", size=48, image="gfc", format="cache", progress=False)
    assert rep["subjects"] == 4 and rep["slices"] > 0
    assert list((tmp_path / "cache").glob("*/index.json"))


def test_prepare_without_images_is_one_clear_error(tmp_path):
    (tmp_path / "empty" / "disc1").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        dl.prepare_oasis1(tmp_path / "empty", tmp_path / "out", progress=False)
    assert str(tmp_path / "empty") in str(e.value) and "T88_111" in str(e.value)
