"""Checkpoints that survive being killed mid-save, and that say so when they are damaged.

File layout (one file per checkpoint, ``<dir>/ckpt-<step:08d>.pt``)::

    offset 0   16 bytes   MAGIC  b"LOWPREC-CKPT-v1\\n"
    offset 16  32 bytes   SHA-256 of the payload
    offset 48   8 bytes   payload length n, unsigned little-endian
    offset 56   n bytes   payload: ``torch.save`` of a dict of tensors and plain values

Writing is atomic: the bytes go to a temporary file in the same directory
(``.ckpt-<step>.pt.tmp-<pid>``), which is flushed and ``fsync``-ed, then ``os.replace``-d onto
the final name (an atomic rename on POSIX filesystems), and the directory is ``fsync``-ed. A
process killed at any moment therefore leaves either the previous set of checkpoints untouched,
or that set plus one complete new file; a partial write exists only under a temporary name,
which nothing ever loads. Reading checks the magic, the length and the digest before
unpickling, so a truncated or garbled file is refused with :class:`CorruptCheckpointError`
naming it (and no file is ever deleted by a load).

Payloads are loaded with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists,
tuples and dicts only (RNG states are stored as tensors for that reason).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MAGIC", "CorruptCheckpointError", "save_checkpoint", "load_checkpoint", "CheckpointManager",
           "resolve_checkpoint", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

MAGIC = b"LOWPREC-CKPT-v1\n"
_HEADER = struct.Struct("<16s32sQ")  # magic, sha256, payload length
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
CHUNK_BYTES = 1 << 22  # writes go out in 4 MiB pieces (a kill can land between any two)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is truncated, garbled or not a checkpoint; the message names it."""


# ----------------------------------------------------------------------------------- one file

def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            view = memoryview(data)
            for i in range(0, len(view), CHUNK_BYTES):
                f.write(view[i:i + CHUNK_BYTES])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename itself must reach the disk before older checkpoints are pruned
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (see the module doc); returns the path."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = _HEADER.pack(MAGIC, hashlib.sha256(body).digest(), len(body))
    _write_atomic(path, header + body)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The payload of the checkpoint at ``path``; ``CorruptCheckpointError`` naming the file when
    it is missing, truncated, garbled, or not a checkpoint."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read checkpoint {str(path)!r}: {e.strerror or e}") from None
    if len(raw) < _HEADER.size:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is truncated: {len(raw)} bytes, "
                                     f"shorter than the {_HEADER.size}-byte header")
    magic, digest, n = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptCheckpointError(f"{str(path)!r} is not a lowprec checkpoint (header {magic!r}, "
                                     f"expected {MAGIC!r})")
    body = memoryview(raw)[_HEADER.size:]
    if len(body) != n:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is truncated: payload has {len(body):,} "
                                     f"bytes, its header says {n:,}")
    if hashlib.sha256(body).digest() != digest:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is corrupt: its SHA-256 does not match "
                                     "the one recorded when it was written")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as e:  # the digest matched: a payload this loader cannot read
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} cannot be unpickled: {e}") from None


# ------------------------------------------------------------------------------ a directory

class CheckpointManager:
    """The checkpoints of one run: ``<dir>/ckpt-<step>.pt``, the newest ``keep`` kept.

    Only names matching ``ckpt-<digits>.pt`` count; temporary files of writes that never
    finished are ignored (and removed when the process that wrote them is gone)."""

    def __init__(self, directory: str | Path, keep: int = 3):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep_ckpts={keep!r} must be an int >= 1 (the newest checkpoint is always kept)")
        self.dir = Path(directory)
        self.keep = keep
        self._remove_stale_temporaries()

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:08d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint file, oldest first (validity not checked)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(self.path_for(step), payload)
        for _, old in self.checkpoints()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest_valid(self, map_location=None) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, and its payload; corrupt newer ones are skipped with a
        warning (and left on disk). None when there are none; ``CorruptCheckpointError`` listing
        them when every one is corrupt."""
        errors = []
        for _, path in reversed(self.checkpoints()):
            try:
                return path, load_checkpoint(path, map_location)
            except CorruptCheckpointError as e:
                log.warning("%s; falling back to the previous checkpoint", e)
                errors.append(str(e))
        if errors:
            raise CorruptCheckpointError(f"no valid checkpoint in {str(self.dir)!r}: " + "; ".join(errors))
        return None

    def _remove_stale_temporaries(self) -> None:
        if not self.dir.is_dir():
            return
        for p in self.dir.glob(".ckpt-*.pt.tmp-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                p.unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest valid checkpoint of a run directory (in its
    ``checkpoints/`` when it has one); ``FileNotFoundError`` naming the path when there is none."""
    path = Path(path)
    if path.is_dir():
        found = CheckpointManager(path / "checkpoints" if (path / "checkpoints").is_dir() else path).latest_valid()
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint in {str(path)!r}")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------- RNGs

def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values
    (torch CPU and CUDA, Python ``random``, NumPy's global generator)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    state["python"] = (version, torch.tensor(internal, dtype=torch.int64), gauss)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
