"""Every filesystem operation on the lake, behind one small class.

The lake root is a local folder or an object-store URI (``s3://bucket/prefix``, ``gs://bucket/prefix``).
Locations are plain strings: an absolute local path, or a full URI. Local folders go through the OS (so
writes can be fsynced and published with one atomic ``rename``); URIs go through ``pyarrow.fs``, whose
S3 and GCS filesystems pick up the usual credentials (``AWS_*`` variables, ``~/.aws``, GCP defaults).

What differs on an object store: there are no real folders and no atomic rename, so ``publish`` copies the
parts under the final prefix and deletes the staging prefix. Readers still never see a half dataset,
because a version only becomes visible once the catalog registers it, after ``publish`` has returned.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


@dataclass(frozen=True)
class Entry:
    """One child of a lake folder."""

    name: str
    location: str
    is_dir: bool
    mtime: float | None  # seconds since the epoch; None where the store does not say


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(_REMOTE_SCHEMES)


class LakeFS:
    """The lake's root and the few operations the store needs, for a local folder or an object store."""

    def __init__(self, root: str | Path, filesystem: pafs.FileSystem | None = None) -> None:
        """``filesystem`` overrides the one derived from the URI (credentials, endpoints, tests)."""
        text = str(root)
        self.is_local = not is_remote(text)
        if self.is_local:
            self.root = str(Path(text.removeprefix("file://")).expanduser().resolve())
        else:
            self.root = text.rstrip("/")
        self._fs: pafs.FileSystem | None = filesystem

    def __repr__(self) -> str:
        return f"LakeFS({self.root!r})"

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem (created lazily: an object store may need credentials and a network)."""
        if self._fs is None:
            self._fs = pafs.LocalFileSystem() if self.is_local else pafs.FileSystem.from_uri(self.root)[0]
        return self._fs

    @property
    def root_path(self) -> Path | str:
        """The root as a ``Path`` for a local lake, as the URI otherwise."""
        return Path(self.root) if self.is_local else self.root

    def child(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if not self.is_local else str(Path(self.root, *parts))

    def sql_prefix(self) -> str:
        """The prefix DuckDB's ``allowed_directories`` must hold to read this lake."""
        return self.root.rstrip("/") + "/"

    def _path(self, location: str) -> str:
        """``location`` as the pyarrow filesystem names it (no scheme for object stores)."""
        if self.is_local:
            return location
        return location.split("://", 1)[1]

    def is_dir(self, location: str) -> bool:
        if self.is_local:
            return Path(location).is_dir()
        return self.filesystem.get_file_info(self._path(location)).type == pafs.FileType.Directory

    def makedirs(self, location: str) -> None:
        if self.is_local:
            Path(location).mkdir(parents=True, exist_ok=True)
        else:
            self.filesystem.create_dir(self._path(location), recursive=True)

    def list(self, location: str) -> list[Entry]:
        """Children of a folder (empty if it does not exist), sorted by name."""
        if self.is_local:
            folder = Path(location)
            if not folder.is_dir():
                return []
            entries = []
            for child in folder.iterdir():
                try:
                    stat = child.stat()
                except FileNotFoundError:  # removed while listing
                    continue
                entries.append(Entry(child.name, str(child), child.is_dir(), stat.st_mtime))
            return sorted(entries, key=lambda e: e.name)
        infos = self.filesystem.get_file_info(pafs.FileSelector(self._path(location), allow_not_found=True))
        return sorted(
            (
                Entry(
                    info.base_name,
                    f"{location.rstrip('/')}/{info.base_name}",
                    info.type == pafs.FileType.Directory,
                    info.mtime.timestamp() if info.mtime is not None else None,
                )
                for info in infos
            ),
            key=lambda e: e.name,
        )

    def remove_tree(self, location: str) -> None:
        """Delete a folder and everything in it; a missing folder is not an error."""
        if self.is_local:
            shutil.rmtree(location, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_dir(self._path(location))

    def write_file(self, location: str, write: Callable[[Any], None]) -> None:
        """Call ``write(sink)`` with a binary sink for ``location``; local files are fsynced after."""
        if self.is_local:
            with open(location, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            return
        with self.filesystem.open_output_stream(self._path(location)) as sink:
            write(sink)

    def open_input(self, location: str) -> IO[bytes] | pa.NativeFile:
        if self.is_local:
            return open(location, "rb")
        return self.filesystem.open_input_file(self._path(location))

    def publish(self, staging: str, target: str) -> None:
        """Move a finished staging folder to ``target``, replacing whatever an unregistered run left there.

        Locally this is one atomic ``rename`` (then the parent folder is fsynced); on an object store it is
        a copy of each part followed by deleting the staging prefix.
        """
        if self.is_local:
            if Path(target).exists():
                shutil.rmtree(target)
            os.rename(staging, target)
            _fsync_dir(Path(target).parent)
            return
        self.remove_tree(target)
        self.makedirs(target)
        for entry in self.list(staging):
            self.filesystem.copy_file(self._path(entry.location), self._path(f"{target}/{entry.name}"))
        self.remove_tree(staging)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
