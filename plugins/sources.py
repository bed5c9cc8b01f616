"""The built-in data sources: JSONL files (plain or gzip), JSON lists, Parquet files and
directories, ``datasets.save_to_disk`` directories and hub ids.

A data set setting names a path (claimed by the one source that reads it) or ``name:spec`` to
pick a source by name. The path sources' claims exclude each other: a ``.json`` (or
``.json.gz``) file is ``json``, a ``.parquet`` file or a directory of Parquet shards is
``parquet``, a directory with ``state.json`` or ``dataset_dict.json`` is ``arrow``, any other
regular file is ``jsonl``. Hub ids (``hf:org/name``) are only read when named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preftune import ConfigError, RecordError, Source, hookimpl
from preftune.data import check_readable, file_sha256, read_records
from preftune.data.jsonl import (
    SURROGATE_ESCAPE,
    lone_surrogate,
    open_stream,
    read_failure,
    refuse_constant,
    unique_keys,
)
from preftune.types import Read

from .sources_columnar import ArrowDirSource, ParquetSource, is_parquet_file, is_saved_dataset
from .sources_hub import HubSource

JSON_SUFFIXES = (".json", ".json.gz")


def is_json_file(spec: str) -> bool:
    """A regular file named ``*.json`` or ``*.json.gz`` (any case)."""
    return spec.lower().endswith(JSON_SUFFIXES) and Path(spec).is_file()


class JsonlSource:
    """A JSONL file, plain or gzip-compressed (by its bytes): ``file:line`` locations."""

    def claims(self, spec: str) -> bool:
        return Path(spec).is_file() and not is_json_file(spec) and not is_parquet_file(spec)

    def check(self, spec: str, key: str) -> None:
        check_readable(spec, key)

    def identity(self, spec: str) -> dict[str, str]:
        return {"sha256": file_sha256(spec)}

    def records(self, spec: str) -> Iterator[Read]:
        return read_records(spec)


class Refused:
    """Stands in, while a JSON list is parsed, for a value JSON does not allow (a key given
    twice, ``NaN``), so that one bad record is an error at its row, not the whole file's."""

    def __init__(self, error: RecordError):
        self.error = error


def lenient_object(items: list[tuple[str, Any]]) -> Any:
    """``unique_keys``, with its refusal kept in place of the object."""
    try:
        return unique_keys(items)
    except RecordError as exc:
        return Refused(exc)


def lenient_constant(name: str) -> Any:
    """``refuse_constant``, with its refusal kept in place of the number."""
    try:
        return refuse_constant(name)
    except RecordError as exc:
        return Refused(exc)


def first_refused(value: Any) -> tuple[str, RecordError] | None:
    """The path and error of the first refused value inside a record, or None (iterative)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, Refused):
            inner = f"{path}.{item.error.field}" if path and item.error.field else path or item.error.field
            return inner, item.error
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


class JsonListSource:
    """A ``.json`` file holding one JSON list of records, parsed as strictly as JSONL:
    ``file#row`` locations (0-based), file-level problems at ``file:line``."""

    def claims(self, spec: str) -> bool:
        return is_json_file(spec)

    def check(self, spec: str, key: str) -> None:
        check_readable(spec, key)
        with open(spec, "rb") as raw:
            stream, problem = open_stream(raw)
            if problem is None:
                head = stream.read(4096).lstrip(b" \t\r\n")
                if head and not head.startswith(b"["):
                    problem = ("holds a JSON " + ("object" if head.startswith(b"{") else "value")
                               + ", not a list of records; a .json data set is one JSON list "
                               "[{...}, {...}] (for one record per line, name the file .jsonl)")
        if problem is not None:
            raise ConfigError(f"{key} {spec}: {problem}")

    def identity(self, spec: str) -> dict[str, str]:
        return {"sha256": file_sha256(spec)}

    def records(self, spec: str) -> Iterator[Read]:
        text, where, error = read_text(spec)
        if error is not None:
            yield where, None, error
            return
        surrogates = SURROGATE_ESCAPE.search(text) is not None
        for row, (value, where, error) in enumerate(elements(spec, text)):
            if error is not None:
                yield where, None, error
                return
            yield Source(spec, row, "#"), *checked(value, surrogates)


def read_text(spec: str) -> tuple[str, Source, RecordError | None]:
    """The file's text (gzip decompressed, a BOM skipped), or where and why it is not UTF-8 JSON."""
    with open(spec, "rb") as raw:
        stream, problem = open_stream(raw)
        if problem is not None:
            return "", Source(spec, 1), RecordError("", problem)
        try:
            data = stream.read()
        except (OSError, EOFError) as exc:
            return "", Source(spec, 1), RecordError("", f"cannot read the file: {read_failure(exc)}")
    try:
        return data.decode("utf-8"), Source(spec, 1), None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return "", Source(spec, line), RecordError("", f"not valid UTF-8: byte 0x{data[exc.start]:02x} "
                                                   f"at byte {column} of the line (save the file as UTF-8)")


def elements(spec: str, text: str) -> Iterator[tuple[Any, Source, RecordError | None]]:
    """The list's elements one at a time (only one record is held as Python objects at once),
    then, if the text is not one JSON list, where (``file:line``) and why."""
    decoder = json.JSONDecoder(object_pairs_hook=lenient_object, parse_constant=lenient_constant)
    pos = skip_space(text, 0)
    if not text.startswith("[", pos):
        what = "object" if text.startswith("{", pos) else "value"
        yield None, Source(spec, line_of(text, pos)), RecordError(
            "", f"the file holds a JSON {what}, not a list of records; a .json data set is one JSON "
            "list [{...}, ...]")
        return
    pos = skip_space(text, pos + 1)
    closed = text.startswith("]", pos)
    while not closed:
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield None, Source(spec, exc.lineno), RecordError(
                "", f"malformed JSON: {exc.msg} at column {exc.colno} (is the file cut short?)")
            return
        except (RecursionError, ValueError) as exc:  # nesting too deep, a number of thousands of digits
            yield None, Source(spec, line_of(text, pos)), RecordError("", f"cannot parse the record: {exc!r}")
            return
        yield value, Source(spec, 0), None
        pos = skip_space(text, pos)
        closed = text.startswith("]", pos)
        if not closed and not text.startswith(",", pos):
            yield None, Source(spec, line_of(text, pos)), RecordError(
                "", "malformed JSON: expected ',' or ']' after a record (is the file cut short?)")
            return
        pos = skip_space(text, pos + 1) if not closed else pos
    end = skip_space(text, pos + 1)
    if end < len(text):
        yield None, Source(spec, line_of(text, end)), RecordError(
            "", "malformed JSON: more text after the list's closing ']'")


def skip_space(text: str, pos: int) -> int:
    """The position of the first non-whitespace character from ``pos`` (JSON's whitespace)."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def line_of(text: str, pos: int) -> int:
    """The 1-based line of a position in the text."""
    return text.count("\n", 0, pos) + 1


def checked(record: Any, surrogates: bool) -> tuple[Any, RecordError | None]:
    """``(record, None)``, or ``(None, error)`` naming the field JSON (or UTF-8) does not allow."""
    refused = first_refused(record)
    if refused is not None:
        return None, RecordError(refused[0], refused[1].message)
    field = lone_surrogate(record) if surrogates else None
    if field is not None:
        return None, RecordError(field, "holds a lone surrogate escape (\\ud800-\\udfff without its "
                                 "pair): not a character, it cannot be encoded or tokenized")
    return record, None


@hookimpl
def register_sources(register: Any) -> None:
    register("jsonl", lambda config, options: JsonlSource())
    register("json", lambda config, options: JsonListSource())
    register("parquet", lambda config, options: ParquetSource(config.dataset_split))
    register("arrow", lambda config, options: ArrowDirSource(config.dataset_split))
    register("hf", lambda config, options: HubSource(config.dataset_split, config.dataset_config))


__all__ = ["ArrowDirSource", "HubSource", "JsonListSource", "JsonlSource", "ParquetSource",
           "is_saved_dataset"]
