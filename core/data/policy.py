"""What a run does with a record it cannot read: stop (``on_bad_record = "error"``, the default),
or leave it out (``"skip"``), listing each in ``log_path/skipped.jsonl`` with its location, field,
reason and the raw record (its JSON cut at :data:`RAW_LIMIT` characters). ``max_bad_fraction``
stops a skipping run whose bad share is above it, so that a wrong format cannot skip a whole file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, Problem
from ..fileio import atomic_file

RAW_LIMIT = 2000  # characters of a skipped record's JSON kept in skipped.jsonl
SKIPPED = "skipped.jsonl"


class Raw(str):
    """A record's JSON text as :func:`raw_text` cut it (read back from a cache)."""


def raw_text(record: Any) -> str | None:
    """The record as JSON text, cut at :data:`RAW_LIMIT` characters (None when there is none)."""
    if record is None or isinstance(record, Raw):
        return record
    text = json.dumps(record, ensure_ascii=False, default=repr)
    return text if len(text) <= RAW_LIMIT else text[:RAW_LIMIT] + "..."


def skipped_rows(problems: Sequence[Problem]) -> list[dict[str, Any]]:
    """One row of skipped.jsonl per bad record."""
    return [{"where": str(p.where), "field": p.field, "reason": p.reason,
             "record": raw_text(p.record)} for p in problems]


def apply(config: Any, problems: Sequence[Problem], records: int, log_path: Path | None,
          log: Any = print) -> None:
    """Stop on bad records (``error``, or ``skip`` above ``max_bad_fraction``), or write them
    to skipped.jsonl and say how many were left out."""
    if not problems:
        if log_path is not None:
            (log_path / SKIPPED).unlink(missing_ok=True)  # an earlier run's list is not this one's
        return
    if config.on_bad_record == "error":
        raise DataError(list(problems), total=records,
                        hint='set on_bad_record = "skip" to train without them')
    share = len(problems) / max(records, 1)
    if share > config.max_bad_fraction:
        raise DataError(list(problems), total=records, hint=(
            f"that is {share:.1%} of the records, above max_bad_fraction = {config.max_bad_fraction}: "
            "is format right for this data? (raise max_bad_fraction to skip them anyway)"))
    if log_path is not None:
        rows = skipped_rows(problems)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        atomic_file(log_path / SKIPPED, lambda handle: handle.write(text))
    log(f"skipping {len(problems)} bad record(s) of {records} ({share:.2%}); each is listed in "
        f"{(log_path / SKIPPED) if log_path is not None else 'skipped.jsonl'}")
