"""Errors a user can act on. The CLI prints their message without a traceback."""

from __future__ import annotations


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


class DataError(PreftuneError):
    """Bad lines in a dataset file: each problem is ``(file, line, field, message)``."""

    def __init__(self, problems: list[tuple[str, int, str, str]], total: int | None = None):
        self.problems = problems
        self.report: object | None = None  # set by tokenization: the good pairs' truncations
        shown = [format_problem(*p) for p in problems[:20]]
        more = len(problems) - len(shown)
        if more:
            shown.append(f"... and {more} more")
        count = f"{len(problems)} bad record(s)" + (f" of {total}" if total is not None else "")
        super().__init__(count + ":\n" + "\n".join(shown))


class DiskError(PreftuneError):
    """A file or directory cannot be written or read: the path and the system's reason (a full
    disk, no permission, a file where a directory should be)."""

    def __init__(self, path: object, cause: str, verb: str = "write", what: str = ""):
        self.path, self.cause, self.verb = str(path), cause, verb
        super().__init__(f"cannot {verb} {what + ' ' if what else ''}{path}: {cause}")


class TrainingError(PreftuneError):
    """Training cannot go on, e.g. the loss is NaN or infinite."""


def format_problem(file: str, line: int, field: str, message: str) -> str:
    """Render one data problem as ``file:line: field 'x': message``."""
    where = f"{file}:{line}" if line else file
    return f"{where}: field {field!r}: {message}" if field else f"{where}: {message}"
