"""Reading brain MRI slices from every layout users have, split by subject, cached as uint8.

Layouts (detected from the folder):
- ``keras``: the official preprocessed OASIS PNG set, ``keras_png_slices_{train,validate,test}/`` with
  optional ``keras_png_slices_seg_*`` masks (``case_441_slice_0`` pairs with ``seg_441_slice_0``;
  mask values 0/85/170/255 become labels 0..3).
- ``split-png``: a folder with ``train/``, ``validate/`` (or ``val/``) and ``test/`` folders of PNG slices.
- ``png``: any other folder of PNG slices; split here by subject.
- ``volumes``: a folder (searched recursively) or file of 3D volumes: NIfTI, Analyze 7.5 (.hdr/.img) and
  FreeSurfer .mgz, read with nibabel, reoriented to RAS, sliced along an axis, robustly scaled to [0, 1]
  per volume and padded (or resized) to the training size; split here by subject.

Every slice records its subject, source file, slice number, split and relative position in its volume
(PNG slices named ``..._slice_K`` get K over their subject's slice count; other PNG slices get NaN).
The first load of a set of sources writes a cache (uint8 memory-mapped slices plus a JSON index) keyed by
a hash of the files and the settings; later loads map it in without decoding anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import DataConfig
from .errors import DataError

CACHE_VERSION = 2  # 2: PNG slices named ..._slice_K carry a position (v1 caches hold NaN)
SPLITS = ("train", "validate", "test")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".mgz")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validate": "validate", "validation": "validate",
                  "val": "validate", "valid": "validate", "test": "test", "testing": "test"}
_SUBJECT_PATTERNS = [
    (re.compile(r"OAS1_(\d{4})"), "OAS1_{}"),
    (re.compile(r"sub-(\d+)"), "OAS1_{:0>4}"),  # OASIS-1 BIDS-style names carry the OASIS number
    (re.compile(r"(?:case|seg)_(\d+)"), "case_{}"),  # keras PNG set: its own case numbering
]
_FOREGROUND = 0.05  # intensity (in [0, 1]) above which a pixel counts as head
_SLICE_NUMBER = re.compile(r"slice_?(\d+)")


def subject_of(path: Path | str) -> str:
    """Subject ID from a file name: ``OAS1_0441``, ``sub-0441`` -> ``OAS1_0441``; ``case_441`` kept;
    otherwise the file name without extension and slice suffix."""
    name = Path(path).name
    for pattern, fmt in _SUBJECT_PATTERNS:
        m = pattern.search(name)
        if m:
            return fmt.format(m.group(1))
    stem = name.split(".")[0]
    return re.sub(r"_slice_?\d+$", "", stem)


# ----------------------------------------------------------------------------------------------- readers


def fit_to_size(img: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Centre-pad a 2D slice to size x size; one larger than that is padded square and resized down."""
    h, w = img.shape
    if h > size or w > size:
        side = max(h, w)
        img = _pad_centre(img, side)
        mode = Image.NEAREST if nearest else Image.BILINEAR
        if img.dtype == np.uint8:
            return np.asarray(Image.fromarray(img).resize((size, size), mode))
        return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size), mode))
    return _pad_centre(img, size)


def _pad_centre(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape
    out = np.zeros((side, side), dtype=img.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = img
    return out


def read_png(path: Path) -> np.ndarray:
    """An 8-bit grey 2D array from an image file, or a DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                a = np.asarray(im, dtype=np.float64)
                a = (a - a.min()) / max(a.max() - a.min(), 1e-8) * 255
                return a.round().astype(np.uint8)
            return np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Image.DecompressionBombError as e:  # a header claiming a gigantic image
        raise DataError(f"{path}: refusing to decode an implausibly large image ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def read_mask(path: Path) -> np.ndarray:
    """Segmentation labels 0..3 from a keras-set mask (values 0/85/170/255)."""
    return np.clip(np.rint(read_png(path) / 85.0), 0, 3).astype(np.uint8)


def load_volume(path: Path) -> np.ndarray:
    """A 3D float32 volume in RAS orientation (nibabel), or a DataError naming the file."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise DataError(f"{path}: a {len(img.shape)}D volume of shape {img.shape}; oasisvq reads 3D volumes")
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 -- nibabel raises many types for bad files; all mean the same to a user
        raise DataError(f"{path}: nibabel cannot read this volume ({type(e).__name__}: {e})") from None
    if data.size == 0:
        raise DataError(f"{path}: empty volume (shape {data.shape})")
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data


def scale_robust(vol: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map a volume to [0, 1] by its low/high percentiles (the high one taken over non-background voxels)."""
    lo = float(np.percentile(vol, low))
    above = vol[vol > lo]
    hi = float(np.percentile(above, high)) if above.size else lo
    if hi <= lo:
        return np.zeros_like(vol, dtype=np.float32)
    return np.clip((vol - lo) / (hi - lo), 0, 1).astype(np.float32)


def volume_slices(vol: np.ndarray, axis: str = "axial") -> np.ndarray:
    """2D slices of a RAS volume along ``axis``, oriented like the OASIS PNG set (front of the head to
    the right for axial slices; top of the head up for coronal and sagittal). Returns (S, H, W)."""
    if axis == "axial":
        return np.moveaxis(vol, 2, 0)  # rows run left->right of the patient, columns back->front
    if axis == "coronal":
        return np.rot90(np.moveaxis(vol, 1, 0), axes=(1, 2))
    if axis == "sagittal":
        return np.rot90(vol, axes=(1, 2))
    raise DataError(f"unknown slicing axis {axis!r}: use axial, coronal or sagittal")


def slice_volume(vol: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scaled, sliced, filtered, fitted uint8 slices of one volume.

    Returns (slices (S, size, size) uint8, slice numbers (S,), relative positions in [0, 1] (S,) within the
    head-bearing range of the volume)."""
    slices = volume_slices(scale_robust(vol), cfg.axis)
    fg = (slices > _FOREGROUND).mean(axis=(1, 2))
    keep = np.flatnonzero(fg >= max(cfg.min_foreground, 1e-9))
    if keep.size == 0:
        return np.zeros((0, cfg.size, cfg.size), np.uint8), keep, np.zeros(0, np.float32)
    first, last = keep[0], keep[-1]
    pos = ((keep - first) / max(last - first, 1)).astype(np.float32)
    out = np.stack([fit_to_size(np.rint(slices[k] * 255).astype(np.uint8), cfg.size) for k in keep])
    return out, keep, pos


def tilt_volume(vol: np.ndarray, degrees: tuple[float, float, float], scale: float = 1.0) -> np.ndarray:
    """``vol`` (RAS, isotropic voxels) turned about its centre by ``degrees`` about the left-right, back-front
    and up axes (applied in that order) and scaled by ``scale``; zeros outside.

    Cubic B-spline interpolation: trilinear blurs an oblique cut by about a third (mean |Laplacian| inside
    the head of a 5-degree tilt), cubic by about a tenth; the result is clipped to the input's range, so the
    spline's overshoot at the skull makes no new intensities."""
    from scipy import ndimage  # here, not at the top: it adds about 0.2 s to every import of this module

    a, b, c = np.deg2rad(degrees)
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    about_z = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    read_from = (about_z @ about_y @ about_x).T / scale  # output voxel p (from the centre) reads R^T p / scale
    centre = (np.array(vol.shape) - 1) / 2
    vol = np.asarray(vol, np.float32)
    out = ndimage.affine_transform(vol, read_from, offset=centre - read_from @ centre, order=3, mode="constant")
    return np.clip(out, vol.min(initial=0), vol.max(initial=0))


def images_tensor(images: np.ndarray) -> torch.Tensor:
    """Float batch (B, 1, H, W) in [0, 1] of uint8 slices (B, H, W)."""
    return torch.from_numpy(images).unsqueeze(1).float().div_(255.0)


# --------------------------------------------------------------------------------------------- discovery


@dataclass
class SourceFile:
    path: Path
    kind: str  # "png" | "volume"
    split: str | None  # given by the layout, else assigned by subject
    subject: str
    mask: Path | None = None


@dataclass
class Discovery:
    root: Path
    layout: str
    files: list[SourceFile] = field(default_factory=list)


def _is_volume(p: Path) -> bool:
    return p.name.lower().endswith(VOLUME_SUFFIXES)


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def discover(path: Path | str, image_pattern: str = "") -> Discovery:
    """Find the slices or volumes under ``path`` and say which layout they are in."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    if root.is_file():
        if _is_volume(root):
            return Discovery(root, "volumes", [SourceFile(_volume_path(root), "volume", None, subject_of(root))])
        if root.suffix.lower() == ".png":
            return Discovery(root, "png", [SourceFile(root, "png", None, subject_of(root))])
        raise DataError(f"{root}: not a PNG slice or a volume (.nii, .nii.gz, .hdr/.img, .mgz)")

    subdirs = {p.name: p for p in root.iterdir() if p.is_dir()}
    keras = {s: subdirs[f"keras_png_slices_{s}"] for s in SPLITS if f"keras_png_slices_{s}" in subdirs}
    if keras:
        files = []
        for split, folder in keras.items():
            seg_dir = subdirs.get(f"keras_png_slices_seg_{split}")
            for p in _pngs(folder):
                mask = None
                if seg_dir is not None:
                    cand = seg_dir / re.sub(r"^case_", "seg_", p.name)
                    mask = cand if cand.is_file() else None
                files.append(SourceFile(p, "png", split, subject_of(p), mask))
        return _nonempty(Discovery(root, "keras", files))

    split_dirs = {_SPLIT_ALIASES[n.lower()]: p for n, p in subdirs.items() if n.lower() in _SPLIT_ALIASES}
    if split_dirs and any(_pngs(p) for p in split_dirs.values()):
        files = [SourceFile(p, "png", split, subject_of(p)) for split, d in split_dirs.items() for p in _pngs(d)]
        return _nonempty(Discovery(root, "split-png", files))

    volumes = _find_volumes(root, image_pattern)
    if volumes:
        return Discovery(root, "volumes", [SourceFile(v, "volume", None, subject_of(v)) for v in volumes])
    pngs = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".png")
    if pngs:
        return Discovery(root, "png", [SourceFile(p, "png", None, subject_of(p)) for p in pngs])
    raise DataError(
        f"{root}: no PNG slices or volumes found (looked for keras_png_slices_* folders, train/validate/test "
        f"folders, *.png and {', '.join(VOLUME_SUFFIXES)} files)"
    )


def _slice_number(path: Path) -> int | None:
    m = _SLICE_NUMBER.search(Path(path).name)
    return int(m.group(1)) if m else None


def png_levels(files: list[SourceFile]) -> list[float]:
    """Relative position in [0, 1] of each PNG slice named ``..._slice_K`` of one source: K over the number of
    its subject's slices found there, all split folders together (a subject sits in one split). NaN for
    volumes (they get theirs when sliced), unnumbered names and a subject's only slice (no level to tell)."""
    nums = [_slice_number(f.path) if f.kind == "png" else None for f in files]
    found: dict[str, set[int]] = {}
    for f, k in zip(files, nums):
        if k is not None:
            found.setdefault(f.subject, set()).add(k)
    # K / (n - 1) as the official set numbers 0..n-1; max(K) keeps it in [0, 1] where slices are missing
    return [k / max(len(found[f.subject]) - 1, max(found[f.subject]))
            if k is not None and len(found[f.subject]) > 1 else np.nan for f, k in zip(files, nums)]


def _nonempty(d: Discovery) -> Discovery:
    if not d.files:
        raise DataError(f"{d.root}: the {d.layout} layout was found but holds no PNG slices")
    return d


def _volume_path(p: Path) -> Path:
    """Analyze pairs are named by their .img (nibabel finds the .hdr beside it)."""
    return p.with_suffix(".img") if p.suffix.lower() == ".hdr" else p


def _find_volumes(root: Path, image_pattern: str) -> list[Path]:
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and _is_volume(p):
            if p.suffix.lower() in (".img", ".hdr"):
                # an Analyze image needs both halves; a lone .img or .hdr is reported when read
                found.setdefault(_volume_path(p), None)
            else:
                found[p] = None
    paths = list(found)
    if image_pattern:
        paths = [p for p in paths if p.match(image_pattern) or Path(p.name).match(image_pattern)]
    else:
        # The raw OASIS-1 release holds raw scans, atlas-registered images and segmentations side by
        # side; the processed, masked, gain-field-corrected T88 image is the one to train on.
        t88 = [p for p in paths if p.name.endswith("_t88_masked_gfc.img")]
        if t88:
            paths = t88
    return paths


# ----------------------------------------------------------------------------------------------- splits


def assign_splits(files: list[SourceFile], fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split by subject: layouts with their own splits keep them; the other subjects are shuffled with
    ``seed`` and dealt out by ``fractions`` (at least one subject per split when there are three or more)."""
    fixed: dict[str, str] = {}
    for f in files:
        if f.split is not None:
            fixed.setdefault(f.subject, f.split)
    free = sorted({f.subject for f in files if f.split is None and f.subject not in fixed})
    rng = np.random.default_rng(seed)
    order = [free[i] for i in rng.permutation(len(free))]
    n = len(order)
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    if n >= 3:
        n_val = max(n_val, 1) if fractions[1] > 0 else 0
        n_test = max(n_test, 1) if fractions[2] > 0 else 0
    n_train = max(n - n_val - n_test, 0)
    for i, s in enumerate(order):
        fixed[s] = "train" if i < n_train else "validate" if i < n_train + n_val else "test"
    return [f.split if f.split is not None else fixed[f.subject] for f in files]


# ------------------------------------------------------------------------------------------------ dataset


class SliceSet:
    """Slices (uint8, N x H x W, usually memory-mapped) with per-slice subject, source, split, position.

    ``split("train")`` gives a view of one split; ``tensor(idx)`` a float batch (B, 1, H, W) in [0, 1].
    """

    def __init__(self, images: np.ndarray, index: dict, masks: np.ndarray | None = None,
                 rows: np.ndarray | None = None):
        self._images, self._masks, self.index = images, masks, index
        self.rows = np.arange(images.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        self.subjects = np.asarray(index["subjects"], dtype=object)[self.rows]
        self.sources = np.asarray(index["sources"], dtype=object)[self.rows]
        self.slice_numbers = np.asarray(index["slices"], dtype=np.int64)[self.rows]
        self.splits = np.asarray(index["splits"], dtype=object)[self.rows]
        self.position = np.asarray(index["positions"], dtype=np.float32)[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self._images.shape[1:])

    @property
    def has_masks(self) -> bool:
        return self._masks is not None

    @property
    def images(self) -> np.ndarray:
        return np.asarray(self._images[self.rows])

    @property
    def masks(self) -> np.ndarray | None:
        return None if self._masks is None else np.asarray(self._masks[self.rows])

    def split(self, name: str, required: bool = True) -> SliceSet:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        rows = self.rows[self.splits == name]
        if required and rows.size == 0:
            where = ", ".join(self.index.get("roots", [])) or "the data"
            raise DataError(f"{where}: the {name!r} split has no slices")
        return SliceSet(self._images, self.index, self._masks, rows)

    def subset(self, idx: np.ndarray) -> SliceSet:
        return SliceSet(self._images, self.index, self._masks, self.rows[np.asarray(idx, dtype=np.int64)])

    def uint8(self, idx: np.ndarray | list[int]) -> np.ndarray:
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential on a memmap
        out = np.empty((len(rows), *self.shape), np.uint8)
        out[order] = self._images[rows[order]]
        return out

    def tensor(self, idx: np.ndarray | list[int]) -> torch.Tensor:
        """Float batch (B, 1, H, W) in [0, 1] of the slices at positions ``idx`` of this set."""
        return images_tensor(self.uint8(idx))

    def nearest_levels(self, levels: list[float] | np.ndarray) -> list[int]:
        """Positions in this set of its first subject's slices nearest each of ``levels``: one head, for
        figures that set real slices beside samples level by level."""
        own = np.where(self.subjects == self.subjects[0], self.position, np.inf)
        return [int(np.argmin(np.abs(own - lv))) for lv in levels]

    def summary(self) -> dict:
        out = {}
        for s in SPLITS:
            sel = self.splits == s
            out[s] = {"slices": int(sel.sum()), "subjects": len(set(self.subjects[sel]))}
        return out


# --------------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    env = os.environ.get("OASISVQ_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "oasisvq"


def _cache_key(discoveries: list[Discovery], cfg: DataConfig) -> str:
    files = []
    for d in discoveries:
        for f in d.files:
            for p in (f.path, f.mask) if f.mask else (f.path,):
                st = p.stat() if p.exists() else None
                files.append([str(p.resolve()), st.st_size if st else -1, st.st_mtime_ns if st else -1])
    settings = {k: v for k, v in asdict(cfg).items() if k != "paths"}
    blob = json.dumps({"version": CACHE_VERSION, "files": files, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_slices(cfg: DataConfig, cache_dir: Path | str | None = None, skip_bad: bool = False,
                progress: bool = True) -> SliceSet:
    """All slices of ``cfg.paths``, split by subject, from the cache (built on first use)."""
    cfg.validate()
    if not cfg.paths:
        raise DataError("no data path given")
    discoveries = [discover(p, cfg.image_pattern) for p in cfg.paths]
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = _cache_key(discoveries, cfg)
    final = cache_root / key
    if not (final / "index.json").is_file():
        _build_cache(discoveries, cfg, final, skip_bad, progress)
    slices = open_cache(final)
    skipped = slices.index.get("skipped", [])
    if skipped and not skip_bad:  # a cache built with skip_bad must not quietly drop files for a call without it
        raise DataError(f"{skipped[0]} ({len(skipped)} unreadable file(s) in all); fix or remove them, or pass "
                        "--skip-bad to leave them out")
    return slices


def open_cache(folder: Path) -> SliceSet:
    folder = Path(folder)
    try:
        index = json.loads((folder / "index.json").read_text())
        n, h, w = index["shape"]
        images = np.memmap(folder / "images.u8", dtype=np.uint8, mode="r", shape=(n, h, w)) if n else \
            np.zeros((0, h, w), np.uint8)
        masks = None
        if index.get("has_masks") and n:
            masks = np.memmap(folder / "masks.u8", dtype=np.uint8, mode="r", shape=(n, h, w))
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{folder}: damaged slice cache ({e}); delete the folder to rebuild it") from None
    for w_ in index.get("warnings", []):
        warnings.warn(w_, stacklevel=2)
    return SliceSet(images, index, masks)


def _build_cache(discoveries: list[Discovery], cfg: DataConfig, final: Path, skip_bad: bool,
                 progress: bool) -> None:
    files = [f for d in discoveries for f in d.files]
    levels = [x for d in discoveries for x in png_levels(d.files)]  # per source: needs all its files
    splits = assign_splits(files, cfg.split_fractions, cfg.seed)
    has_masks = any(f.mask is not None for f in files)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index = {"version": CACHE_VERSION, "roots": [str(d.root) for d in discoveries],
             "layouts": [d.layout for d in discoveries], "settings": asdict(cfg),
             "subjects": [], "sources": [], "slices": [], "splits": [], "positions": [],
             "has_masks": has_masks, "warnings": [], "skipped": []}
    resized = 0
    n = 0
    try:
        with open(tmp / "images.u8", "wb") as fi, open(tmp / "masks.u8", "wb") as fm:
            for f, split, level in tqdm(list(zip(files, splits, levels)), desc="reading slices", unit="file",
                                        disable=not progress, leave=False):
                try:
                    imgs, mks, nums, pos, was_resized = _read_source(f, cfg, level)
                except DataError as e:
                    if not skip_bad:
                        raise
                    index["skipped"].append(str(e))
                    continue
                resized += was_resized
                fi.write(np.ascontiguousarray(imgs).tobytes())
                if has_masks:
                    fm.write(np.ascontiguousarray(mks).tobytes())
                k = len(imgs)
                n += k
                index["subjects"] += [f.subject] * k
                index["sources"] += [str(f.path)] * k
                index["slices"] += [int(x) for x in nums]
                index["splits"] += [split] * k
                index["positions"] += [float(x) if np.isfinite(x) else None for x in pos]
            fi.flush()
            os.fsync(fi.fileno())
        if n == 0:
            raise DataError(f"{', '.join(index['roots'])}: no usable slices (all files empty or skipped)")
        if resized:
            index["warnings"].append(
                f"{resized} slice(s) were not {cfg.size}x{cfg.size} and were padded/resized to it")
        index["positions"] = [np.nan if p is None else p for p in index["positions"]]
        index["shape"] = [n, cfg.size, cfg.size]
        (tmp / "index.json").write_text(json.dumps(index, allow_nan=True))
        if not has_masks:
            (tmp / "masks.u8").unlink()
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "index.json").is_file():  # another process may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for w_ in index["warnings"]:
        warnings.warn(w_, stacklevel=3)


def _read_source(f: SourceFile, cfg: DataConfig, level: float = np.nan):
    """One source file -> (images, masks or None, slice numbers, positions, count resized); ``level`` is a PNG
    slice's position (from ``png_levels``)."""
    if f.kind == "volume":
        imgs, nums, pos = slice_volume(load_volume(f.path), cfg)
        zeros = np.zeros_like(imgs)
        return imgs, zeros, nums, pos, 0
    img = read_png(f.path)
    if img.size == 0:
        raise DataError(f"{f.path}: empty image")
    resized = int(img.shape != (cfg.size, cfg.size))
    fitted = fit_to_size(img, cfg.size)
    mask = np.zeros_like(fitted)
    if f.mask is not None:
        m = read_mask(f.mask)
        if m.shape != img.shape:
            raise DataError(f"{f.mask}: mask shape {m.shape} differs from its image {f.path} {img.shape}")
        mask = fit_to_size(m, cfg.size, nearest=True)
    return fitted[None], mask[None], [_slice_number(f.path) or 0], [level], resized


# Heads lie in a scanner turned by a few degrees and differ in size by a few percent: a training volume turned
# and scaled this much and sliced again gives new, real cross-sections of the same anatomy (pitch, roll, yaw).
TILT_DEGREES = (10.0, 6.0, 6.0)
TILT_SCALE = 0.06
TILT_VERSION = 2  # of tilt_volume's resampling (1 was trilinear), kept beside cached codes of tilted copies


def tilted_slices(cfg: DataConfig, copies: int, seed: int = 0, progress: bool = True):
    """Yield (slices uint8 (S, size, size), levels (S,)) of ``copies`` randomly tilted copies of every training
    volume of ``cfg`` (split as ``load_slices`` splits them), each sliced as ``load_slices`` slices volumes.
    Copy k of training volume i is drawn from ``seed``, i and k alone: the same for every call."""
    files = [f for p in cfg.paths for f in discover(p, cfg.image_pattern).files]
    train = [f for f, split in zip(files, assign_splits(files, cfg.split_fractions, cfg.seed)) if split == "train"]
    flat = [f.path for f in train if f.kind != "volume"]
    if flat:
        raise DataError(f"{flat[0]}: tilted copies are made from 3D volumes; this is a 2D slice")
    for i, f in enumerate(tqdm(train, desc="tilt", disable=not progress, leave=False)):
        vol = load_volume(f.path)
        for k in range(copies):
            draw = np.random.default_rng([seed, i, k])
            degrees = draw.uniform(-1, 1, 3) * TILT_DEGREES
            images, _, levels = slice_volume(tilt_volume(vol, degrees, 1 + draw.uniform(-TILT_SCALE, TILT_SCALE)), cfg)
            yield images, levels


# ------------------------------------------------------------------------------------------------ inspect


def inspect(path: Path | str, cfg: DataConfig | None = None, grid_png: Path | str | None = None,
            cache_dir: Path | str | None = None, skip_bad: bool = False, progress: bool = True) -> dict:
    """What a data folder holds: layout, subjects and slices per split, shape, intensity range, how many
    slices carry a position, problems.

    Writes a grid of sample slices to ``grid_png`` when given."""
    cfg = cfg or DataConfig()
    cfg = DataConfig(**{**asdict(cfg), "paths": [str(path)]})
    disc = discover(path, cfg.image_pattern)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ss = load_slices(cfg, cache_dir=cache_dir, skip_bad=skip_bad, progress=progress)
    problems = [str(w.message) for w in caught] + list(ss.index.get("skipped", []))
    overlap = _subjects_in_several_splits(ss)
    if overlap:
        problems.append(f"{len(overlap)} subject(s) appear in more than one split, e.g. {sorted(overlap)[:3]}")
    sample = ss.uint8(np.linspace(0, len(ss) - 1, min(len(ss), 512)).astype(int))
    report = {
        "path": str(path), "layout": disc.layout, "files": len(disc.files), "slices": len(ss),
        "subjects": len(set(ss.subjects)), "splits": ss.summary(), "shape": list(ss.shape),
        "intensity_min": int(sample.min()), "intensity_max": int(sample.max()),
        "intensity_mean": round(float(sample.mean()) / 255, 4),
        "head_fraction": round(float((sample > _FOREGROUND * 255).mean()), 4),
        "masks": ss.has_masks, "slices_with_position": int(np.isfinite(ss.position).sum()),
        "problems": problems,
    }
    if grid_png:
        from .figures import slice_grid

        pick = np.linspace(0, len(ss) - 1, min(len(ss), 16)).astype(int)
        titles = [f"{ss.subjects[i]} [{ss.splits[i]}]" for i in pick]
        slice_grid(ss.uint8(pick), Path(grid_png), titles=titles, title=f"{path} ({disc.layout})")
        report["grid"] = str(grid_png)
    return report


def _subjects_in_several_splits(ss: SliceSet) -> set[str]:
    seen: dict[str, set] = {}
    for subj, split in zip(ss.subjects, ss.splits):
        seen.setdefault(subj, set()).add(split)
    return {s for s, v in seen.items() if len(v) > 1}
