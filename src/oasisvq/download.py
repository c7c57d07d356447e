"""Fetching the OASIS-1 release and turning it into a slice set.

``download_oasis1`` streams the cross-sectional disc archives (``oasis_cross-sectional_discN.tar.gz``,
about 1.5 GB each) with resumable, retried, size- and MD5-checked transfers, records the MD5 of every
completed file in ``checksums.json`` and unpacks each archive safely (no member may land outside the
target folder). ``prepare_oasis1`` slices each subject's atlas-registered T88 image (and optionally its
FSL tissue segmentation) into the familiar ``keras_png_slices_*`` PNG layout, split by subject, or into
the slice cache, and joins the subjects to the OASIS demographics table.

Using OASIS data means accepting its Data Use Agreement; ``download_oasis1`` refuses to start without it.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import requests
import urllib3
from PIL import Image
from tqdm import tqdm

from .checkpoint import _fsync_dir, atomic_write_csv, atomic_write_text
from .config import DataConfig
from .data import (
    SPLITS,
    SourceFile,
    assign_splits,
    fit_to_size,
    load_slices,
    load_volume,
    slice_volume,
    subject_of,
    volume_slices,
)
from .errors import ConfigError, DataError

OASIS_ACKNOWLEDGEMENT = (
    "Data were provided by OASIS-1: Cross-Sectional: Principal Investigators: D. Marcus, R. Buckner, "
    "J. Csernansky, J. Morris; P50 AG05681, P01 AG03991, P01 AG026276, R01 AG021910, P20 MH071616, "
    "U24 RR021382"
)
OASIS_CREDIT = f"{OASIS_ACKNOWLEDGEMENT}; Marcus et al. 2007, J Cogn Neurosci 19:1498."  # under figures and reports
OASIS_CITATION = (
    "Marcus DS, Wang TH, Parker J, Csernansky JG, Morris JC, Buckner RL. Open Access Series of Imaging "
    "Studies (OASIS): cross-sectional MRI data in young, middle aged, nondemented, and demented older "
    "adults. J Cogn Neurosci 2007;19(9):1498-1507."
)
OASIS_TERMS = (
    "OASIS-1 data use terms (summary):\n"
    "  - You must agree to the OASIS Data Use Agreement: https://www.oasis-brains.org/#access\n"
    "  - You must never attempt to identify the subjects.\n"
    "  - Publications using the data must acknowledge OASIS:\n"
    f"    \"{OASIS_ACKNOWLEDGEMENT}\"\n"
    f"    and cite {OASIS_CITATION}"
)

DEFAULT_URL = "https://download.nrg.wustl.edu/data/"
ALTERNATIVE_URL = "https://www.oasis-brains.org/files/"
URL_ENV = "OASISVQ_OASIS1_URL"
DISCS = tuple(range(1, 13))
DEMOGRAPHICS = "oasis_cross-sectional.csv"
KNOWN_MD5 = {"oasis_cross-sectional_disc1.tar.gz": "c83e216ef8654a7cc9e2a30a4cdbe0cc"}
DEMOGRAPHIC_COLUMNS = ("M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF")

TIMEOUT = (15.0, 60.0)  # connect, read (seconds without a byte)
RETRIES = 5  # further attempts after a connection error, a 5xx or a short transfer
BACKOFF_S = 2.0  # wait before retry k: BACKOFF_S * 2**k
CHUNK = 1 << 20


class TermsNotAccepted(ConfigError):
    """The OASIS data use terms were not accepted (``accept_terms=True`` / ``--accept-terms``)."""


def disc_name(n: int) -> str:
    return f"oasis_cross-sectional_disc{n}.tar.gz"


# ---------------------------------------------------------------------------------------------- download


def download_oasis1(out: Path | str, discs: list[int] | None = None, accept_terms: bool = False,
                    base_url: str | None = None, progress: bool = True,
                    checksums: dict[str, str] | None = None) -> dict:
    """Download (resuming), verify and unpack OASIS-1 disc archives into ``out``.

    ``base_url`` (else ``$OASISVQ_OASIS1_URL``, else the NRG server with oasis-brains.org as fallback)
    is the folder holding the archives. ``checksums`` maps file names to known MD5s (default
    :data:`KNOWN_MD5`). Returns what was downloaded, verified, unpacked and which archive members were
    refused."""
    print(OASIS_TERMS, file=sys.stderr)
    if not accept_terms:
        raise TermsNotAccepted(
            "the OASIS-1 data use terms must be accepted before downloading (pass accept_terms=True / "
            f"--accept-terms).\n{OASIS_TERMS}")
    discs = list(DISCS if discs is None else discs)
    bad = [d for d in discs if d not in DISCS]
    if bad or not discs:
        raise ConfigError(f"OASIS-1 discs are numbered 1..12, got {discs}")
    chosen = base_url or os.environ.get(URL_ENV)
    bases = [chosen] if chosen else [DEFAULT_URL, ALTERNATIVE_URL]
    known = KNOWN_MD5 if checksums is None else checksums
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"out": str(out), "files": {}, "unpacked": [], "already_unpacked": [],
                    "skipped_members": {}, "demographics": None, "acknowledgement": OASIS_ACKNOWLEDGEMENT}
    with requests.Session() as session:
        session.headers["Accept-Encoding"] = "identity"  # the archive bytes, not a decoded stream
        for n in discs:
            name = disc_name(n)
            marker = out / ".oasisvq" / f"disc{n}.unpacked.json"
            report["files"][name] = _fetch_verified(session, bases, name, out, known.get(name), progress)
            if marker.is_file():
                report["already_unpacked"].append(n)
                continue
            skipped = safe_extract(out / name, out)
            report["skipped_members"][name] = skipped
            report["unpacked"].append(n)
            atomic_write_text(marker, json.dumps({"archive": name, "skipped": skipped}, indent=1))
        try:
            _fetch_verified(session, bases, DEMOGRAPHICS, out, known.get(DEMOGRAPHICS), progress)
            report["demographics"] = str(out / DEMOGRAPHICS)
        except DataError as e:  # optional: a missing table is not an error
            print(f"note: no demographics table ({e}); continuing without it", file=sys.stderr)
    for name, skipped in report["skipped_members"].items():
        if skipped:
            print(f"{name}: refused {len(skipped)} unsafe member(s): " + "; ".join(skipped), file=sys.stderr)
    return report


class _NotFound(DataError):
    pass


class _Retry(Exception):
    pass


def _fetch_verified(session, bases: list[str], name: str, out: Path, md5: str | None, progress: bool) -> dict:
    """``out/name`` downloaded (or found) and checked; its MD5 recorded in ``out/checksums.json``."""
    final = out / name
    record_path = out / "checksums.json"
    records = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if final.is_file():
        got = file_md5(final)
        want = md5 or records.get(name, {}).get("md5")
        if want and got != want:
            raise DataError(f"{final}: MD5 {got} differs from the expected {want}; delete the file to "
                            "download it again")
        status = "verified"
    else:
        errors = []
        for base in bases:
            url = f"{base.rstrip('/')}/{name}"
            try:
                status = _download(session, url, final, progress)
                break
            except _NotFound as e:
                errors.append(str(e))
        else:
            raise _NotFound("; ".join(errors))
        got = file_md5(final.with_name(name + ".part"))
        if md5 and got != md5:
            final.with_name(name + ".part").unlink()
            raise DataError(f"{name}: MD5 {got} differs from the expected {md5}; the download was deleted "
                            "(run again to fetch it anew)")
        os.replace(final.with_name(name + ".part"), final)
        _fsync_dir(out)
    records = json.loads(record_path.read_text()) if record_path.is_file() else {}
    records[name] = {"md5": got, "bytes": final.stat().st_size}
    atomic_write_text(record_path, json.dumps(records, indent=1, sort_keys=True))
    return {"status": status, **records[name]}


def _download(session, url: str, final: Path, progress: bool) -> str:
    """Stream ``url`` into ``final.part``, resuming it; returns "downloaded" or "resumed". Raises
    DataError once the retries are spent (the .part is kept so a later run resumes it)."""
    part = final.with_name(final.name + ".part")
    resumed = part.is_file() and part.stat().st_size > 0
    last = ""
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            if _stream_once(session, url, part, progress):
                return "resumed" if resumed else "downloaded"
        except _Retry as e:
            last = str(e)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
            last = f"{type(e).__name__}: {e}"
        except requests.RequestException as e:
            raise DataError(f"{url}: {type(e).__name__}: {e}") from None
        except OSError as e:
            raise DataError(f"{part}: cannot write the download ({e})") from None
    raise DataError(f"{url}: download failed after {RETRIES + 1} attempts ({last}); the partial file "
                    f"{part} was kept and a later run resumes it")


def _stream_once(session, url: str, part: Path, progress: bool) -> bool:
    """One request: append to ``part`` from its current size. True when the file is complete."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as resp:
        if resp.status_code == 416 and offset:  # the .part is not a prefix of this file
            part.unlink()
            raise _Retry(f"{part.name}: the server refused to resume at byte {offset}; starting again")
        if resp.status_code in (401, 403, 404, 410):
            raise _NotFound(f"{url}: not found (HTTP {resp.status_code})")
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Retry(f"{url}: HTTP {resp.status_code}")
        if resp.status_code not in (200, 206):
            raise DataError(f"{url}: HTTP {resp.status_code} {resp.reason}")
        start, total = 0, None  # a 200 (a server that ignores Range) restarts the file from byte 0
        if resp.status_code == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != offset:  # another range than asked for: drop the .part, ask for everything
                part.unlink(missing_ok=True)
                raise _Retry(f"{url}: answered {resp.headers.get('Content-Range')!r} to bytes={offset}-")
        elif "Content-Length" in resp.headers:
            total = int(resp.headers["Content-Length"])
        mode = "ab" if start else "wb"
        with open(part, mode) as f, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[:-5], disable=not progress,
                                         leave=False) as bar:
            broke = ""
            try:
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (urllib3.exceptions.HTTPError, requests.RequestException) as e:
                broke = f" (the transfer broke off: {type(e).__name__})"
            f.flush()
            os.fsync(f.fileno())
    got = part.stat().st_size
    if (total is not None and got != total) or broke:
        raise _Retry(f"{part.name}: expected {total} bytes, got {got}{broke}")
    return True


def _content_range(value: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    try:
        _unit, rest = value.split(" ", 1)
        span, total = rest.split("/")
        return int(span.split("-")[0]), None if total.strip() == "*" else int(total)
    except ValueError:
        return -1, None


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ unpack


def safe_extract(archive: Path | str, dest: Path | str) -> list[str]:
    """Extract a tar archive into ``dest``, refusing members with absolute paths or ``..``, links that
    point outside ``dest``, device files and FIFOs. Returns "member: reason" for each refused member."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    skipped: list[str] = []

    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        reason = _unsafe(member, root)
        if reason is None and hasattr(tarfile, "data_filter"):
            try:
                return tarfile.data_filter(member, path)
            except tarfile.FilterError as e:
                reason = str(e)
        if reason is not None:
            skipped.append(f"{member.name}: {reason}")
            return None
        member = copy.copy(member)
        member.mode &= 0o755  # no setuid/setgid/sticky or group/world write
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        return member

    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter=check)
            else:  # Python < 3.11.4: the same checks by hand
                checked = (check(m, str(dest)) for m in tar.getmembers())
                tar.extractall(dest, members=[m for m in checked if m is not None])
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{archive}: cannot unpack ({type(e).__name__}: {e})") from None
    return skipped


def _unsafe(member: tarfile.TarInfo, root: str) -> str | None:
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or re.match(r"[A-Za-z]:", name):
        return "absolute path"
    if ".." in Path(name.replace("\\", "/")).parts:
        return "path with '..'"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "device file, FIFO or other special member"
    target = os.path.realpath(os.path.join(root, name))
    if not _inside(target, root):
        return "path outside the target folder"
    if member.issym() or member.islnk():
        link = member.linkname
        if os.path.isabs(link):
            return f"link to the absolute path {link}"
        base = os.path.dirname(os.path.join(root, name)) if member.issym() else root
        if not _inside(os.path.realpath(os.path.join(base, link)), root):
            return f"link pointing outside the target folder ({link})"
    return None


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


# ------------------------------------------------------------------------------------------------ prepare


def _find_t88(src: Path, image: str) -> dict[str, Path]:
    """Session name (``OAS1_0441_MR1``) -> its T88 image; one session per subject (the first, MR1)."""
    by_subject: dict[str, tuple[str, Path]] = {}
    for p in sorted(src.rglob(f"*_t88_{image}.img")):
        m = re.match(r"(OAS1_\d{4}_MR\d+)_", p.name)
        if m and p.parent.name == "T88_111":
            by_subject.setdefault(subject_of(m.group(1)), (m.group(1), p))
    return dict(by_subject.values())


def _mask_for(image_path: Path, session: str) -> Path | None:
    seg_dir = image_path.parents[3] / "FSL_SEG" if len(image_path.parents) > 3 else None
    if seg_dir is None:
        return None
    cand = seg_dir / f"{session}_mpr_n4_anon_111_t88_masked_gfc_fseg.img"
    if cand.is_file():
        return cand
    hits = sorted(seg_dir.glob(f"{session}_*_fseg.img"))
    return hits[0] if hits else None


def _read_demographics(src: Path) -> dict[str, dict[str, str]]:
    for folder in (src, src.parent):
        table = folder / DEMOGRAPHICS
        if table.is_file():
            with open(table, newline="", encoding="utf-8-sig") as f:
                return {row.get("ID", "").strip(): row for row in csv.DictReader(f)}
    return {}


def _save_png(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def prepare_oasis1(src: Path | str, out: Path | str, axis: str = "axial", size: int = 256,
                   image: str = "masked_gfc", with_masks: bool = False, format: str = "png",
                   split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
                   progress: bool = True) -> dict:
    """Slice the OASIS-1 T88 images under ``src`` into ``out``.

    ``format="png"`` writes ``out/keras_png_slices_{split}/case_XXXX_slice_N.nii.png`` (XXXX is the OASIS
    subject number) and, with ``with_masks``, ``keras_png_slices_seg_{split}/seg_XXXX_slice_N.nii.png``
    (FSL tissue labels 0..3 stored as 0/85/170/255), plus ``subjects.csv``. Subjects already written are
    skipped. ``format="cache"`` builds the slice cache in ``out`` instead (no masks)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    cfg = DataConfig(paths=[str(src)], size=size, axis=axis, split_fractions=tuple(split_fractions),
                     image_pattern=f"*_t88_{image}.img", seed=seed)
    cfg.validate()
    if format not in ("png", "cache"):
        raise ConfigError(f"format must be png or cache, got {format!r}")
    if not src.is_dir():
        raise DataError(f"{src}: no such folder")
    images = _find_t88(src, image)
    if not images:
        raise DataError(
            f"{src}: no OASIS-1 T88 images found (looked for */PROCESSED/MPRAGE/T88_111/"
            f"OAS1_XXXX_MR1_mpr_n4_anon_111_t88_{image}.img with its .hdr); unpack the discs first")
    if format == "cache":
        if with_masks:
            raise ConfigError("masks are written with format='png' only; the slice cache holds images")
        ss = load_slices(cfg, cache_dir=out, progress=progress)
        return {"format": "cache", "out": str(out), "subjects": len(set(ss.subjects)), "slices": len(ss),
                "splits": ss.summary()}

    settings = {"axis": axis, "size": size, "image": image}
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "oasisvq-prepare.json"
    if settings_file.is_file():
        old = json.loads(settings_file.read_text())
        if old != settings:
            raise ConfigError(f"{out} was prepared with {old}; these settings are {settings}: use another "
                              "output folder")
    else:
        atomic_write_text(settings_file, json.dumps(settings))
    markers = out / ".oasisvq-done"
    sessions = sorted(images)
    files = [SourceFile(images[s], "volume", None, subject_of(s)) for s in sessions]
    splits = dict(zip(sessions, assign_splits(files, cfg.split_fractions, seed)))
    written, skipped, no_mask, done = 0, 0, [], {}
    for session in tqdm(sessions, desc="preparing subjects", unit="subject", disable=not progress):
        marker = markers / f"{session}.json"
        if marker.is_file():
            prev = json.loads(marker.read_text())
            splits[session] = prev["split"]  # a subject keeps its split, even when new subjects arrive
            if (prev["with_masks"] or not with_masks) and all((out / p).is_file() for p in prev["files"]):
                done[session] = prev
                skipped += 1
                continue
        done[session] = _prepare_subject(images[session], session, splits[session], out, cfg, with_masks)
        if with_masks and not done[session]["masks"]:
            no_mask.append(session)
        atomic_write_text(marker, json.dumps(done[session]))
        written += 1
    demo = _read_demographics(src)
    _write_subjects_csv(out / "subjects.csv", done, demo)
    return {"format": "png", "out": str(out), "subjects": len(sessions), "written": written,
            "skipped": skipped, "slices": sum(d["slices"] for d in done.values()),
            "subjects_per_split": {s: sum(d["split"] == s for d in done.values()) for s in SPLITS},
            "without_masks": no_mask, "demographics": bool(demo)}


def _prepare_subject(img_path: Path, session: str, split: str, out: Path, cfg: DataConfig,
                     with_masks: bool) -> dict:
    number = session.split("_")[1]  # OAS1_0441_MR1 -> 0441
    vol = load_volume(img_path)
    slices, nums, _ = slice_volume(vol, cfg)
    mask_path = _mask_for(img_path, session) if with_masks else None
    masks = None
    if mask_path is not None:
        labels = np.clip(np.rint(load_volume(mask_path)), 0, 3).astype(np.uint8)
        if labels.shape != vol.shape:
            raise DataError(f"{mask_path}: segmentation of shape {labels.shape}, its image {img_path} "
                            f"has {vol.shape}")
        masks = volume_slices(labels, cfg.axis)  # the same slice numbers as the image
    img_dir = out / f"keras_png_slices_{split}"
    seg_dir = out / f"keras_png_slices_seg_{split}"
    img_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for arr, k in zip(slices, nums):
        name = f"case_{number}_slice_{int(k)}.nii.png"
        _save_png(img_dir / name, arr)
        names.append(f"{img_dir.name}/{name}")
        if masks is not None:
            seg_dir.mkdir(parents=True, exist_ok=True)
            m = fit_to_size(np.ascontiguousarray(masks[k]), cfg.size, nearest=True)
            _save_png(seg_dir / f"seg_{number}_slice_{int(k)}.nii.png", np.minimum(m, 3) * 85)
            names.append(f"{seg_dir.name}/seg_{number}_slice_{int(k)}.nii.png")
    return {"session": session, "subject": subject_of(f"case_{number}"), "split": split,
            "slices": len(nums), "masks": masks is not None, "with_masks": with_masks, "files": names,
            "source": str(img_path)}


def _write_subjects_csv(path: Path, done: dict[str, dict], demo: dict[str, dict[str, str]]) -> None:
    cols = list(DEMOGRAPHIC_COLUMNS) if demo else []
    rows = [{"subject": d["subject"], "session": session, "split": d["split"], "slices": d["slices"],
             "masks": int(d["masks"]), **{c: (demo.get(session, {}).get(c) or "").strip() for c in cols}}
            for session, d in sorted(done.items())]
    atomic_write_csv(path, rows, ["subject", "session", "split", "slices", "masks", *cols])

