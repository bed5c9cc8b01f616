"""Which source reads a data set setting, refused before anything loads when none can.

``dataset = "name:spec"`` names a registered source (``hf:org/name``, ``parquet:dir``); any other
value is a path read by the one source that claims it. A path that is neither a regular file nor a
directory (a FIFO, a socket, a device) is refused before it is opened: reading a FIFO blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..types import DataSource, Read, Source
from .jsonl import unreadable


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


class ObjectSource:
    """Records of a Python object: a ``datasets.Dataset`` (or any sized iterable of dicts) handed
    to ``run(config, dataset=...)``; record ``i`` is at ``dataset#i``, as ``dataset[i]`` finds it."""

    def __init__(self, key: str, data: Any):
        if isinstance(data, dict):  # a DatasetDict is a dict of splits
            splits = ", ".join(map(str, data.keys()))
            raise ConfigError(f"{key}: a {type(data).__name__} of splits ({splits}); pass one split, "
                              f"e.g. {key}=ds[{next(iter(data.keys()), 'train')!r}]")
        if not hasattr(data, "__iter__") or isinstance(data, (str, bytes)):
            raise ConfigError(f"{key}: a {type(data).__name__} is not a data set; pass a path, "
                              "hf:org/name, or a datasets.Dataset")
        self.key, self.data = key, data

    def claims(self, spec: str) -> bool:
        return False

    def check(self, spec: str, key: str) -> None:
        pass

    def identity(self, spec: str) -> dict[str, str]:
        """The dataset's fingerprint (``datasets`` changes it with every transform), else the
        sha256 of its records."""
        fingerprint = getattr(self.data, "_fingerprint", None)
        if fingerprint:
            return {"fingerprint": str(fingerprint)}
        digest = hashlib.sha256()
        for record in self.data:
            digest.update(json.dumps(record, sort_keys=True, default=repr).encode())
        return {"sha256": digest.hexdigest()}

    def records(self, spec: str) -> Iterator[Read]:
        for row, record in enumerate(self.data):
            yield Source(self.key, row, "#"), record, None


def open_object(key: str, data: Any) -> Opened:
    """A Python object as the data set ``key`` (``run(config, dataset=ds)``)."""
    return Opened(key, key, ObjectSource(key, data), "")


def refuse_special(value: str, key: str) -> None:
    """A FIFO, socket or device is refused before it is opened (opening a FIFO blocks until a
    writer comes); a missing path says where it was looked for."""
    path = Path(value)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise unreadable(value, key, exc) from None
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
