"""Files a run writes: atomic (a reader never sees a half-written file or directory), with the
modes the umask gives, and with the OS's refusals (a full disk, no permission, a file where a
directory should be) turned into a :class:`DiskError` naming the path and the cause. Also the
lock that makes a log_path one run's, and the removal of what interrupted saves left behind."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DiskError

# Libraries that do their own I/O report the OS's error in their message: Rust ("os error 28",
# safetensors) or a wrapped Python OSError ("[Errno 28] ...").
ERRNO_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def os_errno(exc: BaseException | None) -> int | None:
    """The errno behind ``exc``: its own, one in its cause/context chain, or one in its text."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        match = ERRNO_IN_TEXT.search(str(exc))
        if match:
            return int(match.group(1) or match.group(2))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has no space."""
    for where in (path, *path.parents):
        try:
            stat = os.statvfs(where)
        except OSError:
            continue
        return stat.f_bavail == 0
    return False


def disk_error(exc: BaseException, path: str | Path, verb: str = "write") -> DiskError | None:
    """``exc``, raised while writing ``path``, as a :class:`DiskError` when the OS refused the
    write; None when it was something else. torch's writer drops the errno ("unexpected pos"),
    so a failure on a full file system counts as one too."""
    if isinstance(exc, DiskError):
        return exc
    code = os_errno(exc)
    if code is None and isinstance(exc, RuntimeError) and disk_full(Path(path)):
        code = errno.ENOSPC
    return None if code is None else DiskError(path, os.strerror(code), verb)


@contextmanager
def writing(path: str | Path, verb: str = "write") -> Iterator[None]:
    """Turn an OS refusal while writing ``path`` into a :class:`DiskError` naming it."""
    try:
        yield
    except Exception as exc:
        error = disk_error(exc, path, verb)
        if error is None or error is exc:
            raise
        raise error from exc


def umask() -> int:
    """This process's umask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give ``path``, and all under it, the modes a plain ``open``/``mkdir`` would (0644 and 0755
    under umask 022): temporary files and directories are private (0600/0700), and libraries
    that write through such temporary files keep that mode."""
    path, mask = Path(path), umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        executable = item.is_dir() or item.stat().st_mode & 0o111
        os.chmod(item, (0o777 if executable else 0o666) & ~mask)


def locked_temp(parent: Path, prefix: str, suffix: str = "", directory: bool = False
                ) -> tuple[str, int]:
    """A new temporary file or directory in ``parent`` and an open descriptor holding its lock
    (``flock``): :func:`remove_stale` leaves it alone while this process lives. Closing the
    descriptor releases it."""
    while True:
        if directory:
            tmp = tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=suffix)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # removed as stale between its creation and the lock: make another


def remove_stale(directory: str | Path, patterns: Iterable[str]) -> list[Path]:
    """Remove the temporary files and directories matching ``patterns`` in ``directory`` that no
    live process holds (see :func:`locked_temp`): what saves interrupted by a kill, a crash or a
    full disk left behind. Returns what was removed."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    for path in sorted({p for pattern in patterns for p in directory.glob(pattern)}):
        if path.is_symlink():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # being written by a live process
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def ensure_dir(path: str | Path, what: str) -> Path:
    """Create directory ``path`` (the setting ``what``, e.g. ``log_path``) and check that files can
    be created in it; a :class:`DiskError` naming it and the cause otherwise."""
    path = Path(path)
    dangling = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        cause = f"{dangling} is a symbolic link to {os.readlink(dangling)}, which does not exist"
        raise DiskError(path, cause, "create", what)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        cause = "it is a file" if blocker == path else f"{blocker} is a file"
        raise DiskError(path, cause, "create", what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        raise DiskError(path, exc.strerror or str(exc), "write", what) from exc
    return path


def atomic_file(path: str | Path, write: Any) -> None:
    """Call ``write(handle)`` on a temp file beside ``path``, fsync, then rename it over ``path``."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = locked_temp(path.parent, f".{path.name}.", ".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
                follow_umask(tmp)
                os.replace(tmp, path)  # still locked: remove_stale cannot take it meanwhile
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``."""
    atomic_file(path, lambda handle: torch.save(obj, handle))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON via a temp file and a rename."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_file(path, lambda handle: handle.write(text.encode()))


class atomic_dir:
    """``with atomic_dir(path) as tmp:`` write into ``tmp``; on success it replaces ``path``.

    ``tmp`` is a locked temporary directory beside ``path`` (named ``.<name>.*``). A failure in
    the block removes it, and an OS refusal (full disk, permissions) becomes a
    :class:`DiskError` naming ``path``. The files get the modes of the umask."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> str:
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp, self.fd = locked_temp(self.path.parent, f".{self.path.name}.", directory=True)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: BaseException | None, _: Any) -> None:
        try:
            if exc is not None:
                # classified before the temporary directory goes: a full disk is still full
                error = disk_error(exc, self.path) if isinstance(exc, Exception) else None
                shutil.rmtree(self.tmp, ignore_errors=True)
                if error is not None:  # named by the directory the user knows, not the temp
                    raise DiskError(self.path, error.cause, error.verb) from exc
                return
            with writing(self.path):
                follow_umask(self.tmp)
                self._replace()
        finally:
            os.close(self.fd)

    def _replace(self) -> None:
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
    path = directory / ".preftune.lock"
    with writing(path):
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
    with writing(link):
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
