"""The built-in data sources: JSONL files (plain or gzip).

A data set setting names a path (claimed by the one source that reads it) or ``name:spec`` to
pick a source by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preftune import hookimpl
from preftune.data import check_readable, file_sha256, read_records
from preftune.types import Read


class JsonlSource:
    """A JSONL file, plain or gzip-compressed (by its bytes): ``file:line`` locations."""

    def claims(self, spec: str) -> bool:
        return Path(spec).is_file() and not spec.endswith((".json", ".parquet", ".arrow"))

    def check(self, spec: str, key: str) -> None:
        check_readable(spec, key)

    def identity(self, spec: str) -> dict[str, str]:
        return {"sha256": file_sha256(spec)}

    def records(self, spec: str) -> Iterator[Read]:
        return read_records(spec)


@hookimpl
def register_sources(register: Any) -> None:
    register("jsonl", lambda config, options: JsonlSource())
