"""Atomic file writes and safe checkpoints.

Checkpoints are safetensors files: tensors plus a flat string->string metadata map holding JSON. Loading
one never unpickles anything, so a checkpoint from a stranger cannot run code. Every write goes to a
temporary file in the same folder, is fsynced and renamed over the final name, so a crash or a full disk
leaves the previous file intact.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

FORMAT = "oasisvq-checkpoint"
FORMAT_VERSION = 1


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then move ``tmp`` onto ``path``; on any failure ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # full disk, no permission...: name the file the caller asked for, not the temp file
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{e.strerror or e} (nothing written; any previous file is intact)",
                      str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left in ``folder`` when its process was killed
    (SIGKILL, power loss) between creating and renaming them. They never shadow real files (their names
    start with a dot and end in ``.tmp``); this only reclaims the space. Call it only where no other
    process is writing into ``folder``."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_csv(path: Path, rows: list[dict], fieldnames: list[str]) -> None:
    """Rewrite a whole CSV atomically (keys outside ``fieldnames`` are ignored)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + JSON-able metadata atomically as safetensors."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)}

    def write(tmp: Path) -> None:
        try:
            save_file(clean, str(tmp), metadata=header)
        except SafetensorError as e:  # safetensors reports I/O errors (e.g. a full disk) as its own type
            m = re.search(r"os error (\d+)", str(e))
            raise OSError(int(m.group(1)) if m else errno.EIO, str(e)) from e

    atomic_write(Path(path), write)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`. Refuses anything else with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        hint = " (it looks like a pickle: oasisvq never unpickles files)" if _looks_like_pickle(path) else ""
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint{hint}: {e}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: safetensors file without oasisvq metadata; not an oasisvq checkpoint")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {header.get('format_version')} is not supported "
            f"(this oasisvq reads {FORMAT_VERSION})"
        )
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata: {e}") from None
    return tensors, meta


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    # Pickle protocol 2+ starts with 0x80; torch.save zips start with "PK".
    return head[:1] == b"\x80" or head[:2] == b"PK"


def rng_state() -> dict[str, torch.Tensor]:
    """RNG states as tensors, so resuming continues the same random stream."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in states])


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and plain JSON values."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{pid}.{k}"] = v
            else:
                plain_state.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain_state}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                           prefix: str = "opt.") -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith(prefix):
            pid, k = name[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[k] = v
    for pid, st in meta.get("plain_state", {}).items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["param_groups"]
    for g in groups:  # JSON turned tuples into lists
        for k, v in g.items():
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)
    opt.load_state_dict({"state": state, "param_groups": groups})
