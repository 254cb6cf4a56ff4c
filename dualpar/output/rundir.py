"""A run directory: the names of everything a run writes, declared once; writing there safely
(paths kept inside, atomic replacement); what is ours in a directory, removing only that; and
the lock that tells a live run from a dead one.

Light on purpose (no torch): validation uses it before anything heavy is imported.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
VIDEO = "video.mp4"
STATS = "stats.json"
TRACE = "trace.json"
CHECKPOINT = "checkpoint.safetensors"
LOCK = "run.lock"
LATENTS = "latents"
FILES = (MANIFEST, VIDEO, STATS, TRACE, CHECKPOINT, LOCK)
"""Every plain file a run writes at the top of its directory."""
_BLOCK = re.compile(r"block_\d{5}\.safetensors")
_TEMP = re.compile(r"\..+\.[^.]+\.tmp")  # an atomic write's temporary file (.NAME.XXXX.tmp), left by a crash


def block_file(block_id: int) -> str:
    """A block's latents, relative to the run directory."""
    return f"{LATENTS}/block_{block_id:05d}.safetensors"


def frames_made(manifest: dict) -> int:
    """The frames a run has made so far, by its manifest: those in the MP4, or (a run that does not
    decode) those whose latents are written."""
    if manifest.get("video") is None and manifest.get("blocks"):
        return sum(int(b.get("frames", 0)) for b in manifest["blocks"])
    return int(manifest.get("frames_written", 0))


def read_frames_made(path: str) -> int:
    """:func:`frames_made` of the run in ``path``; 0 while it has no readable manifest."""
    import json

    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return frames_made(json.load(f))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0  # not started yet, or being replaced this instant


def foreign(path: str) -> list[str]:
    """Entries of ``path`` that no run of ours writes (relative names; empty for a new directory)."""
    if not os.path.isdir(path):
        return []
    out = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == LATENTS and os.path.isdir(full) and not os.path.islink(full):
            out += [f"{LATENTS}/{n}" for n in sorted(os.listdir(full)) if not (_BLOCK.fullmatch(n) or _TEMP.fullmatch(n))]
        elif not ((name in FILES or _TEMP.fullmatch(name)) and os.path.isfile(full) and not os.path.islink(full)):
            out.append(name)
    return out


def clear(path: str) -> None:
    """Remove what an earlier run wrote in ``path``, and nothing else (see :func:`foreign`)."""
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name in FILES and name != LOCK or _TEMP.fullmatch(name):
            if os.path.isfile(full) and not os.path.islink(full):
                os.remove(full)
    lat = os.path.join(path, LATENTS)
    if os.path.isdir(lat) and not os.path.islink(lat):
        for name in os.listdir(lat):
            if _BLOCK.fullmatch(name) or _TEMP.fullmatch(name):
                os.remove(os.path.join(lat, name))
        if not os.listdir(lat):
            os.rmdir(lat)


class RunInUse(RuntimeError):
    """Another live process holds the run directory."""


class Lock:
    """An exclusive ``flock`` on ``DIR/run.lock``, held by rank 0 for as long as it writes the run.

    The kernel drops it when the process ends, however it ends (kill -9 included): a manifest
    that says "running" while nobody holds the lock belongs to a dead run.
    """

    def __init__(self, path: str):
        self.path = os.path.join(path, LOCK)
        self._fd: int | None = None

    def acquire(self) -> "Lock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUse(f"{os.path.dirname(self.path)} is in use by a running run (pid {pid})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder(path: str) -> str | None:
    """The pid holding ``path``'s run lock, or None when no live process does (a dead or finished run)."""
    lock = os.path.join(path, LOCK)
    if not os.path.isfile(lock):
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


def safe_join(root: str | os.PathLike, relpath: str | os.PathLike) -> Path:
    """``root / relpath``, refusing anything (``..``, absolute paths, symlinks) that resolves outside ``root``."""
    root = Path(root).resolve()
    path = (root / relpath).resolve()
    if path == root or not path.is_relative_to(root):
        raise ValueError(f"path {str(relpath)!r} escapes the output directory {str(root)!r}")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(root: str | os.PathLike, relpath: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``root/relpath`` so readers see either the old or the new file, never a partial one."""
    path = safe_join(root, relpath)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(path.parent.parent)  # make the new directory's entry durable too
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.chmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; give it a normal file's mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _read_umask() -> int:
    # os.umask can only be read by setting it, so it is read once, at import
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
