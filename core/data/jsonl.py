"""Records of dataset files: JSONL, plain or gzip-compressed, each with where it came from.

:func:`read_records` yields ``(where, record, error)`` for every non-blank line: ``where`` is the
file and line a user can find, and exactly one of ``record`` (the parsed JSON value) and ``error``
(a :class:`RecordError`) is set. Nothing is ever misread: bytes that are not UTF-8, a file in
UTF-16 or UTF-32, an archive, JSON that Python's parser accepts but JSON does not (``NaN``), a key
given twice, a lone surrogate escape (not a character: it cannot be encoded or tokenized) and
nesting too deep to parse are each an error naming the line, and the field where there is one.
A UTF-8 byte order mark is skipped; a gzip file (by its magic bytes, whatever its name) is read
as the JSONL it holds, line numbers counting its decompressed lines.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, RecordError
from ..types import Source

UTF8_BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"
# leading bytes -> what the file is; none of them is JSONL preftune can read
NOT_JSONL = (
    (b"\x00\x00\xfe\xff", "UTF-32 text (it starts with a byte order mark)"),
    (b"\xff\xfe\x00\x00", "UTF-32 text (it starts with a byte order mark)"),
    (b"\xfe\xff", "UTF-16 text (it starts with a byte order mark)"),
    (b"\xff\xfe", "UTF-16 text (it starts with a byte order mark)"),
    (b"PK\x03\x04", "a zip archive"),
    (b"BZh", "bzip2-compressed"),
    (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"PAR1", "a Parquet file"),
)
JSON_SPACE = " \t\r\n"  # what JSON calls whitespace; a line of only these is blank
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a cheap test before walking a record


def check_readable(path: str | Path, key: str) -> None:
    """Refuse, before anything loads, a data file setting ``key`` that names no readable file."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{key} {path}: is a directory; the jsonl source reads one file")
    try:
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise unreadable(path, key, exc) from None


def unreadable(path: str | Path, key: str, exc: OSError) -> ConfigError:
    """The setting ``key`` names a path the system refuses: its reason, and for a relative path,
    where it was looked for."""
    file = Path(path)
    tried = "" if file.is_absolute() else (f" (tried {file.absolute()}: relative paths are "
                                           "relative to the current directory)")
    return ConfigError(f"{key} {path}: {exc.strerror}{tried}")


def read_records(path: str | Path) -> Iterator[tuple[Source, Any, RecordError | None]]:
    """Yield ``(where, record, error)`` for each non-blank line of a JSONL (or JSONL.gz) file."""
    name = str(path)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {path}: {exc.strerror}") from None
    with raw:
        stream, problem = open_stream(raw)
        if problem is not None:
            yield Source(name, 1), None, RecordError("", problem)
            return
        number = 0
        try:
            for number, line in enumerate(stream, start=1):
                text, error = decode(line)
                if error is not None:
                    yield Source(name, number), None, error
                elif text.strip(JSON_SPACE):
                    yield Source(name, number), *parse(text)
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt gzip stream
            yield Source(name, number + 1), None, RecordError("", f"cannot read past line {number}: "
                                                              f"{read_failure(exc)}")


def open_stream(raw: IO[bytes]) -> tuple[IO[bytes], str | None]:
    """The file's bytes as JSONL text bytes (gzip decompressed, a UTF-8 BOM skipped), or why the
    file is not JSONL preftune can read."""
    stream: IO[bytes] = raw
    if peek(raw, 2) == GZIP_MAGIC:
        stream = io.BufferedReader(gzip.GzipFile(fileobj=raw))  # type: ignore[arg-type]
    try:
        head = peek(stream, 6)
    except (OSError, EOFError, zlib.error) as exc:
        return stream, f"cannot read the file: {read_failure(exc)}"
    what = next((what for magic, what in NOT_JSONL if head.startswith(magic)), None)
    if what is None and looks_like_utf16(head):
        what = "UTF-16 or UTF-32 text (every other byte is 0)"
    if what is not None:
        return stream, (f"the file is {what}, not JSONL text; preftune reads UTF-8 JSONL, plain or "
                        "gzip-compressed (re-encode or convert it, e.g. iconv -t UTF-8)")
    if head.startswith(UTF8_BOM):
        stream.read(len(UTF8_BOM))
    return stream, None


def peek(stream: IO[bytes], size: int) -> bytes:
    """The next ``size`` bytes of a buffered stream, without consuming them."""
    return stream.peek(size)[:size]  # type: ignore[attr-defined]


def looks_like_utf16(head: bytes) -> bool:
    """JSON text starts with an ASCII character: in UTF-16 or UTF-32 without a byte order mark,
    one of its first two bytes is then 0 (RFC 4627, section 3)."""
    return len(head) >= 2 and (head[0] == 0) != (head[1] == 0)


def read_failure(exc: BaseException) -> str:
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"the gzip stream is truncated or corrupt ({exc})"
    return getattr(exc, "strerror", None) or str(exc)


def decode(line: bytes) -> tuple[str, RecordError | None]:
    """A line's text; invalid UTF-8 is an error naming the byte (never replaced or guessed)."""
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return "", RecordError("", f"not valid UTF-8: byte 0x{line[exc.start]:02x} at byte "
                               f"{exc.start + 1} of the line (save the file as UTF-8)")


def json_position(text: str, exc: json.JSONDecodeError) -> str:
    """Where in the line the JSON broke (json counts the line's own newline as a new line)."""
    if exc.pos >= len(text.rstrip(JSON_SPACE)):
        return "at the end of the line (is the record cut short?)"
    return f"at column {exc.pos + 1}"


def parse(text: str) -> tuple[Any, RecordError | None]:
    """One line's JSON value, or why it is not one faithful record."""
    try:
        record = json.loads(text, object_pairs_hook=unique_keys, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        return None, RecordError("", f"malformed JSON: {exc.msg} {json_position(text, exc)}"
                                 + line_ending_hint(text, exc))
    except RecursionError:
        return None, RecordError("", "JSON nested too deeply to parse (arrays or objects "
                                 "inside each other about a thousand levels deep)")
    except RecordError as exc:
        return None, exc
    except ValueError as exc:  # an integer of thousands of digits (Python refuses to convert it)
        return None, RecordError("", f"holds a number too long to read ({exc})")
    if SURROGATE_ESCAPE.search(text):
        field = lone_surrogate(record)
        if field is not None:
            return None, RecordError(field, "holds a lone surrogate escape (\\ud800-\\udfff without "
                                     "its pair): not a character, it cannot be encoded or tokenized")
    return record, None


def unique_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict, refusing a key given twice (``json`` would keep the last silently,
    which can swap chosen and rejected)."""
    out = dict(items)
    if len(out) != len(items):
        seen: set[str] = set()
        twice = next(key for key, _ in items if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise RecordError(twice, "given twice in one JSON object; which one is meant?")
    return out


def refuse_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are Python's extensions, not JSON."""
    raise RecordError("", f"{name} is not JSON (JSON numbers are finite)")


def line_ending_hint(text: str, exc: json.JSONDecodeError) -> str:
    if exc.msg == "Extra data" and re.search("\r(?!\n)", text):
        return " (the line holds a lone carriage return: JSONL lines end in \\n; convert the line endings)"
    return ""


def lone_surrogate(record: Any) -> str | None:
    """The path of the first string (or key) in ``record`` holding a lone surrogate, or None.
    Iterative: a record may be nested as deep as the parser allows."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and LONE_SURROGATE.search(value):
            return path or "(the line)"
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                if LONE_SURROGATE.search(key):
                    return child.encode("utf-8", "backslashreplace").decode()
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None
