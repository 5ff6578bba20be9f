"""Adapter files stored by content hash: `<root>/<sha256>/adapter_config.json` and
`adapter_model.safetensors`. A directory appears whole or not at all: it is assembled in a scratch
directory on the same file system, synced, and renamed into place. Identical uploads share one copy.

Every scratch directory holds an exclusive `flock` on its `.lock` file while it is in use. The kernel
drops the lock when its process dies, however it dies, so after a crash a restarted gateway can tell
the scratch directories (and the uploads) of dead processes from those of live ones, including other
replicas sharing `state_dir`, and sweep only the dead."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
SHA256 = re.compile(r"^[0-9a-f]{64}$")
LOCK = ".lock"  # in every scratch directory, flock-ed while the directory is in use
NEW = ".new-"  # a scratch directory not yet locked: renamed to its name once it is
NEW_GRACE_S = 60  # an unlocked new one is swept only when older than this


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256.match(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        return self.root / sha256

    @contextmanager
    def scratch(self, name: str | None = None) -> Iterator[Path]:
        """A working directory, locked by this process and removed with everything in it when the
        block ends. `name` (a record id) fixes its name, so that `in_use(name)` tells a restarted
        gateway whether that record's upload still runs somewhere."""
        new = Path(tempfile.mkdtemp(prefix=NEW, dir=self.incoming))
        path = new
        fd = os.open(new / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            target = self.incoming / (name or new.name.removeprefix(NEW))
            os.rename(new, target)  # so it appears locked: a sweep never sees it unlocked while in use
            path = target
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)

    def in_use(self, name: str) -> bool:
        """Whether a live process holds the scratch directory `name`."""
        return _locked(self.incoming / name)

    def put(self, staged: Path, sha256: str) -> Path:
        """Move the directory `staged` (inside a scratch directory) to its place; if that content is
        already stored, keep the stored copy."""
        target = self.path(sha256)
        if target.is_dir():
            return target
        for child in staged.iterdir():
            with child.open("rb") as f:
                os.fsync(f.fileno())
        try:
            os.replace(staged, target)
        except OSError:  # stored meanwhile by a concurrent upload of the same content
            if not target.is_dir():
                raise
        _fsync_dir(self.root)
        return target

    def remove(self, sha256: str) -> None:
        shutil.rmtree(self.path(sha256), ignore_errors=True)

    def sweep(self, referenced: Callable[[], set[str]]) -> list[str]:
        """Remove what crashes left: scratch directories no live process holds, and stored adapters no
        record refers to (`referenced()`: the hashes the registry knows, read after the listing, so
        that an adapter stored meanwhile, whose hash is recorded before its files are stored, is
        kept). Returns the paths removed."""
        removed = []
        for child in list(self.incoming.iterdir()):
            if child.name.startswith(NEW) and time.time() - child.stat().st_mtime < NEW_GRACE_S:
                continue  # being made by a live process, about to be locked
            if not _locked(child):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
                removed.append(str(child))
        stored = [c for c in self.root.iterdir() if SHA256.match(c.name)]
        known = referenced()
        for child in stored:
            if child.name not in known:
                shutil.rmtree(child)
                removed.append(str(child))
        for path in removed:
            log.warning("removed %s: left behind by a crash", path)
        return removed


def _locked(path: Path) -> bool:
    """Whether another open file holds the lock of scratch directory `path` (a live upload)."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
