"""A store on a local filesystem: atomic creates and replaces, durable before they return.

Every write goes to a temporary file in the same directory, is fsynced, then linked
(create: `link` fails if the name exists, so a committed object is never overwritten)
or renamed (replace/put) into place, and the directory is fsynced so the name survives
a power cut. A compare-and-swap replace holds an flock on the run's `.lock` file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from contextlib import contextmanager
from typing import Iterator

from spotrunner.errors import ConfigError, NotFound, PreconditionFailed, StoreError
from spotrunner.stores import Generation

_TMP_PREFIX = ".tmp-"
_LOCK_NAME = ".lock"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad store key {key!r}")
        return os.path.join(self.root, *key.split("/"))

    def _write_temp(self, path: str, data: bytes) -> str:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f"{_TMP_PREFIX}{os.path.basename(path)}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        return temp

    @staticmethod
    def _generation(path: str) -> Generation:
        stat = os.stat(path)
        return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(os.path.join(self.root, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self, key: str, *, deadline: float | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise NotFound(f"{self.url}/{key} does not exist") from None
        except OSError as exc:
            raise StoreError(f"cannot read {self.url}/{key}: {exc.strerror}") from None

    def read_versioned(self, key: str) -> tuple[bytes, Generation]:
        with self._locked():
            data = self.read(key)
            return data, self._generation(self._path(key))

    def create(self, key: str, data: bytes, *, deadline: float | None = None) -> None:
        path = self._path(key)
        temp = self._write_temp(path, data)
        try:
            os.link(temp, path)
        except FileExistsError:
            if self.read(key) != data:
                raise PreconditionFailed(f"{self.url}/{key} already exists with other contents") from None
        finally:
            os.unlink(temp)
        _fsync_dir(os.path.dirname(path))

    def replace(self, key: str, data: bytes, *, if_generation: Generation | None) -> Generation:
        path = self._path(key)
        with self._locked():
            try:
                current: Generation | None = self._generation(path)
            except FileNotFoundError:
                current = None
            if current != if_generation:
                raise PreconditionFailed(
                    f"{self.url}/{key} changed since it was read (expected {if_generation}, found {current})"
                )
            temp = self._write_temp(path, data)
            os.replace(temp, path)
            _fsync_dir(os.path.dirname(path))
            return self._generation(path)

    def put(self, key: str, data: bytes, *, deadline: float | None = None) -> None:
        path = self._path(key)
        temp = self._write_temp(path, data)
        os.replace(temp, path)
        _fsync_dir(os.path.dirname(path))

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(_TMP_PREFIX) or name == _LOCK_NAME:
                    continue
                key = os.path.relpath(os.path.join(directory, name), self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def check_access(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
            probe = self._write_temp(os.path.join(self.root, "access-check"), b"")
            os.unlink(probe)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ConfigError(
                    f"--store {self.root}: not writable ({exc.strerror}); fix its permissions or choose another --store"
                ) from None
            raise ConfigError(f"--store {self.root}: cannot be used ({exc.strerror})") from None
