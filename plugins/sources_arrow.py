"""Arrow data as JSON records: which column types JSON can hold, and record batches as rows.

Shared by the Parquet, ``save_to_disk`` and hub sources. Structs become dicts and lists lists;
a column of a type JSON has no value for (bytes, dates, maps, decimals), or named twice, is
refused by name before anything loads, and a non-finite float (NaN, infinity) is an error at
its row, as in JSONL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from preftune import RecordError

BATCH_ROWS = 1024  # rows converted to Python at a time: memory stays at one batch
JSON_SCALARS = (pa.types.is_null, pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating,
                pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
LISTS = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list, pa.types.is_list_view,
         pa.types.is_large_list_view)


def children(path: str, kind: pa.DataType) -> list[tuple[str, pa.DataType]]:
    """The nested types of a struct, list or dictionary type, with their paths."""
    if pa.types.is_struct(kind):
        return [(f"{path}.{field.name}", field.type) for field in kind]
    if any(test(kind) for test in LISTS):
        return [(f"{path}[]", kind.value_type)]
    if pa.types.is_dictionary(kind):
        return [(path, kind.value_type)]
    return []


def leaf_types(schema: pa.Schema) -> Iterator[tuple[str, pa.DataType]]:
    """Every column path and its type, nested ones included (iterative)."""
    stack = [(field.name, field.type) for field in reversed(schema)]
    while stack:
        path, kind = stack.pop()
        yield path, kind
        stack.extend(reversed(children(path, kind)))


def duplicate_name(schema: pa.Schema) -> str | None:
    """The path of a column (or struct field) named twice at one level, or None: as a dict, a
    row would keep one of them silently (which can swap chosen and rejected)."""
    levels = [("", [field.name for field in schema])]
    levels += [(path, [field.name for field in kind]) for path, kind in leaf_types(schema)
               if pa.types.is_struct(kind)]
    for path, names in levels:
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            return f"{path}.{twice}" if path else twice
    return None


def non_json_column(schema: pa.Schema) -> str | None:
    """A message naming the first column (or nested field) JSON cannot hold, or None."""
    twice = duplicate_name(schema)
    if twice is not None:
        return f"column {twice!r} is named twice; which one is meant? (rename one)"
    for path, kind in leaf_types(schema):
        if not children(path, kind) and not any(test(kind) for test in JSON_SCALARS):
            return (f"column {path!r} is {kind}, which JSON has no value for; records hold strings, "
                    "numbers, booleans, nulls, lists and structs (drop the column or cast it to string)")
    return None


def has_floats(schema: pa.Schema) -> bool:
    """Whether any column (or nested field) is floating point: only then can a row hold NaN."""
    return any(pa.types.is_floating(kind) for _, kind in leaf_types(schema))


def non_finite(record: Any) -> tuple[str, float] | None:
    """The path and value of the first NaN or infinite float in a record, or None (iterative)."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, value
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def rows(batches: Iterable[pa.RecordBatch | pa.Table], floats: bool) -> Iterator[tuple[Any, Any]]:
    """``(record, error)`` for each row of the batches, converted one batch at a time."""
    for batch in batches:
        for record in batch.to_pylist():
            bad = non_finite(record) if floats else None
            if bad is None:
                yield record, None
            else:
                yield None, RecordError(bad[0], f"is {bad[1]}: not JSON (JSON numbers are finite)")
