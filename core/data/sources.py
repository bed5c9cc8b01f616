"""Which source reads a data set setting, refused before anything loads when none can.

``dataset = "name:spec"`` names a registered source (``hf:org/name``, ``parquet:dir``); any other
value is a path read by the one source that claims it. A path that is neither a regular file nor a
directory (a FIFO, a socket, a device) is refused before it is opened: reading a FIFO blocks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..types import DataSource, Read


@dataclass(frozen=True)
class Opened:
    """One data set of a run: the setting that names it, its value, and the source reading it."""

    key: str  # the config key: dataset or eval_dataset
    name: str  # the value as the config gives it
    source: DataSource
    spec: str  # what the source reads: the value without a source's name: prefix

    def records(self) -> Iterator[Read]:
        return self.source.records(self.spec)

    def identity(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.source.identity(self.spec).items()}


def open_source(registry: Any, config: Any, key: str, value: str) -> Opened:
    """The source that reads ``value`` (the setting ``key``), checked: a :class:`ConfigError`
    naming ``key`` when no source can read it."""
    prefix, _, rest = value.partition(":")
    if rest and prefix in registry.names("source") and len(prefix) > 1:  # not a drive letter
        source = registry.build("source", prefix, config)
        source.check(rest, key)
        return Opened(key, value, source, rest)
    refuse_special(value, key)
    claims = [(n, s) for n in registry.names("source")
              if (s := registry.build("source", n, config)).claims(value)]
    if len(claims) > 1:
        raise ConfigError(f"{key} {value}: several sources read it ({', '.join(n for n, _ in claims)}); "
                          f"name one, e.g. {key} = \"{claims[0][0]}:{value}\"")
    if not claims:
        raise ConfigError(unclaimed(registry, key, value))
    claims[0][1].check(value, key)
    return Opened(key, value, claims[0][1], value)


def refuse_special(value: str, key: str) -> None:
    """A FIFO, socket or device is refused before it is opened (opening a FIFO blocks until a
    writer comes); a missing path says where it was looked for."""
    path = Path(value)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        tried = "" if path.is_absolute() else (f" (tried {path.absolute()}: relative paths are "
                                               "relative to the current directory)")
        raise ConfigError(f"{key} {value}: {exc.strerror}{tried}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        what = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        raise ConfigError(f"{key} {value}: is {what}, not a file or directory; preftune reads data "
                          "sets it can read twice (write the data to a file first)")


def unclaimed(registry: Any, key: str, value: str) -> str:
    what = "directory" if Path(value).is_dir() else "file"
    return (f"{key} {value}: no data source reads this {what}; sources: "
            f"{', '.join(registry.names('source'))} (a file: .jsonl, .jsonl.gz, .json, .parquet; "
            "a directory of Parquet shards or of datasets.save_to_disk; hf:org/name for the hub)")
