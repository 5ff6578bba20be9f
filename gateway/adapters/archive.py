"""Unpacking an upload without trusting it: a `.tar.gz`/`.tgz`/`.tar`/`.zip` archive, or plain files.

Nothing is ever extracted by the archive libraries themselves. Each member is checked first (a
relative path with no `..`, a regular file or a directory; never a link, device or FIFO), then copied
byte by byte with the byte count enforced as it goes, so a header that lies about a size, a zip
bomb, or an archive with thousands of members stops at the configured limit."""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from gateway.adapters.config import LifecycleConfig
from gateway.adapters.errors import AdapterRejected

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MARKERS = ("adapter_config.json", "salora_config.json")  # what makes a directory an adapter or a checkpoint
CHUNK = 1 << 20


def _unsafe(message: str) -> AdapterRejected:
    return AdapterRejected(message, code="unsafe_archive")


def _member_path(name: str) -> PurePosixPath:
    """The member's relative path, or a rejection for an absolute path, `..`, or a Windows path."""
    if "\\" in name or "\0" in name:
        raise _unsafe(f"archive member {name!r}: backslashes and NUL are not allowed in paths")
    path = PurePosixPath(name)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise _unsafe(f"archive member {name!r}: absolute paths are not allowed")
    if ".." in path.parts:
        raise _unsafe(f"archive member {name!r}: `..` would leave the archive's directory")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        raise _unsafe(f"archive member {name!r}: empty path")
    return PurePosixPath(*parts)


class _Budget:
    """Counts members and unpacked bytes against the limits."""

    def __init__(self, limits: LifecycleConfig) -> None:
        self.limits = limits
        self.members = 0
        self.bytes = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise AdapterRejected(f"the archive has more than {self.limits.max_members} members", code="too_large",
                                  status=413)

    def check(self, n: int) -> None:
        """Refuse if `n` more bytes would pass the limit (a member's declared size, before copying)."""
        if self.bytes + n > self.limits.max_unpacked_bytes:
            raise AdapterRejected(f"the upload unpacks to more than {self.limits.max_unpacked_bytes} bytes",
                                  code="too_large", status=413)

    def add(self, n: int) -> None:
        """Count `n` bytes actually written."""
        self.check(n)
        self.bytes += n


def _copy(source: IO[bytes], target: Path, budget: _Budget) -> None:
    with target.open("xb") as out:
        while chunk := source.read(CHUNK):
            budget.add(len(chunk))
            out.write(chunk)


def _place(dest: Path, relative: PurePosixPath, seen: set[PurePosixPath]) -> Path:
    if relative in seen:
        raise _unsafe(f"archive member {str(relative)!r} appears twice")
    seen.add(relative)
    target = dest.joinpath(*relative.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _tar_members(tar: tarfile.TarFile, budget: _Budget) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        budget.member()
        yield member


def _unpack_tar(path: Path, dest: Path, budget: _Budget) -> None:
    seen: set[PurePosixPath] = set()
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in _tar_members(tar, budget):
                relative = _member_path(member.name)
                if member.issym() or member.islnk():
                    raise _unsafe(f"archive member {member.name!r} is a link; only regular files are accepted")
                if member.isdir():
                    _place(dest, relative, seen).mkdir(exist_ok=True)
                    continue
                if not member.isreg():
                    raise _unsafe(f"archive member {member.name!r} is not a regular file (device, FIFO or other)")
                budget.check(member.size)  # the copy below counts what is really there
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has data
                _copy(source, _place(dest, relative, seen), budget)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise AdapterRejected(f"not a readable tar archive ({e})", code="bad_archive") from e


def _unpack_zip(path: Path, dest: Path, budget: _Budget) -> None:
    seen: set[PurePosixPath] = set()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                budget.member()
                relative = _member_path(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise _unsafe(f"archive member {info.filename!r} is a link; only regular files are accepted")
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise _unsafe(f"archive member {info.filename!r} is not a regular file (device, FIFO or other)")
                if info.flag_bits & 0x1:
                    raise AdapterRejected(f"archive member {info.filename!r} is encrypted", code="bad_archive")
                if info.is_dir():
                    _place(dest, relative, seen).mkdir(exist_ok=True)
                    continue
                budget.check(info.file_size)
                with archive.open(info) as source:
                    _copy(source, _place(dest, relative, seen), budget)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError) as e:
        raise AdapterRejected(f"not a readable zip archive ({e})", code="bad_archive") from e


def _kind(path: Path, filename: str) -> str | None:
    """`tar` or `zip` for a file named as an archive (its content must agree), None for a plain file
    (never sniffed: a PyTorch pickle is a zip file too)."""
    if not filename.lower().endswith(ARCHIVE_SUFFIXES):
        return None
    with path.open("rb") as f:
        head = f.read(262)
    if filename.lower().endswith(".zip") and head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if not filename.lower().endswith(".zip") and (head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar"):
        return "tar"
    raise AdapterRejected(f"{filename}: not a tar or zip archive", code="bad_archive")


def unpack(parts: list[tuple[str, Path]], dest: Path, limits: LifecycleConfig) -> Path:
    """Unpack the uploaded files (name as sent, where it was saved) into the empty directory `dest`;
    returns the adapter's directory: `dest` itself or the one top-level directory holding it."""
    if not parts:
        raise AdapterRejected("no files: send an archive or the adapter's files", code="missing_file")
    budget = _Budget(limits)
    kinds = [_kind(path, filename) for filename, path in parts]
    if any(kinds) and len(parts) > 1:
        raise AdapterRejected("send one archive, or the adapter's files without an archive", code="bad_archive")
    if kinds[0] == "tar":
        _unpack_tar(parts[0][1], dest, budget)
    elif kinds[0] == "zip":
        _unpack_zip(parts[0][1], dest, budget)
    else:
        seen: set[PurePosixPath] = set()
        for filename, path in parts:
            if not FILE_NAME.match(filename):
                raise _unsafe(f"file name {filename!r}: only a plain name is allowed, no directories")
            budget.member()
            with path.open("rb") as source:
                _copy(source, _place(dest, PurePosixPath(filename), seen), budget)
    return adapter_root(dest)


def adapter_root(dest: Path) -> Path:
    """The directory holding the adapter (or checkpoint) config: the top level or one directory down."""
    roots = {p.parent for marker in MARKERS for p in [*dest.glob(marker), *dest.glob(f"*/{marker}")] if p.is_file()}
    if not roots:
        raise AdapterRejected(f"no {' or '.join(MARKERS)} at the top of the upload or one directory down",
                              code="missing_file")
    if len(roots) > 1:
        raise AdapterRejected("the upload holds more than one adapter; send one at a time", code="bad_archive")
    return roots.pop()
