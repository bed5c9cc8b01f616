"""Atomic writes (a reader never sees a half-written file or directory), and the lock that makes
a log_path one run's."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON via a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class atomic_dir:
    """``with atomic_dir(path) as tmp:`` write into ``tmp``; on success it replaces ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        return self.tmp

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old.{os.getpid()}")
            self.path.rename(old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/.preftune.lock`` for the life of a run. A second run on the same directory
    gets a :class:`ConfigError` naming the first's PID. The lock is the kernel's (``flock``), so it
    goes away with its process: a lock file left by a killed run is simply taken over."""
    import fcntl

    path = directory / ".preftune.lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"log_path {directory} is in use by another preftune run (PID {holder}); "
                          "wait for it to end or choose another log_path") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def switch_symlink(link: str | Path, target: str | Path) -> None:
    """Point ``link`` at ``target`` atomically: readers see the old target or the new one."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
