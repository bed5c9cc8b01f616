"""Errors a user can act on. The CLI prints their message without a traceback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class PreftuneError(Exception):
    """Base class of every error preftune raises for bad input or a failed run."""


class ConfigError(PreftuneError):
    """A config file or value is wrong: an unknown key, a bad value, an unknown plugin name."""


class PluginError(PreftuneError):
    """A plugin is broken or two plugins claim the same component name."""


class RecordError(PreftuneError):
    """A dataset format could not parse one record; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}" if field else message)
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # to and from a worker process
        return type(self), (self.field, self.message)


@dataclass(frozen=True)
class Problem:
    """One bad record: where it is (a :class:`preftune.Source`, or the data set's name for a
    problem of the whole set), the field, why, and the raw record when there is one."""

    where: Any
    field: str
    reason: str
    record: Any = None

    def as_tuple(self) -> tuple[str, int, str, str]:
        """``(file, line or row, field, reason)``; line 0 for a problem of a whole data set."""
        return (getattr(self.where, "file", str(self.where)), getattr(self.where, "line", 0),
                self.field, self.reason)

    def __str__(self) -> str:
        return f"{self.where}: field {self.field!r}: {self.reason}" if self.field \
            else f"{self.where}: {self.reason}"


class DataError(PreftuneError):
    """Bad records in a data set, each a :class:`Problem`; ``hint`` says what to do."""

    def __init__(self, problems: list[Problem], total: int | None = None, hint: str = ""):
        self.problems = problems
        self.report: object | None = None  # set by tokenization: the good pairs' truncations
        shown = [str(p) for p in problems[:20]]
        more = len(problems) - len(shown)
        if more:
            shown.append(f"... and {more} more")
        count = f"{len(problems)} bad record(s)" + (f" of {total}" if total is not None else "")
        super().__init__(count + ":\n" + "\n".join(shown) + (f"\n{hint}" if hint else ""))


class DiskError(PreftuneError):
    """A file or directory cannot be written or read: the path and the system's reason (a full
    disk, no permission, a file where a directory should be)."""

    def __init__(self, path: object, cause: str, verb: str = "write", what: str = ""):
        self.path, self.cause, self.verb = str(path), cause, verb
        super().__init__(f"cannot {verb} {what + ' ' if what else ''}{path}: {cause}")


class TrainingError(PreftuneError):
    """Training cannot go on, e.g. the loss is NaN or infinite."""
