"""Adapter files stored by content hash: `<root>/<sha256>/adapter_config.json` and
`adapter_model.safetensors`. A directory appears whole or not at all: it is assembled in a scratch
directory on the same file system, synced, and renamed into place. Identical uploads share one copy."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    def scratch(self) -> Iterator[Path]:
        """An empty working directory, removed with everything in it when the block ends."""
        path = Path(tempfile.mkdtemp(dir=self.incoming))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

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

    def clear_incoming(self, older_than_s: float = 3600) -> None:
        """Remove scratch directories a crash left behind. Only old ones: replicas sharing the state
        directory may be unpacking an upload right now."""
        now = time.time()
        for child in self.incoming.iterdir():
            if now - child.stat().st_mtime > older_than_s:
                shutil.rmtree(child, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
