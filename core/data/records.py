"""Records to preference pairs: the format of each record, and the checks every format gets.

Every problem is reported with its location and field; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DataError, Problem, RecordError
from ..types import DatasetFormat, PreferencePair, Read
from .jsonl import read_records


class AutoFormat:
    """Picks, for each record, the one registered format whose keys it has."""

    def __init__(self, formats: dict[str, DatasetFormat]):
        self.formats = formats

    def matches(self, record: dict[str, Any]) -> bool:
        return any(f.matches(record) for f in self.formats.values())

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        return self.select(record).parse(record)

    def select(self, record: dict[str, Any]) -> DatasetFormat:
        """The one format that matches ``record``; a :class:`RecordError` otherwise."""
        hits = [name for name, f in self.formats.items() if f.matches(record)]
        if len(hits) > 1:
            raise RecordError("", f"record matches several formats ({', '.join(hits)}); set format")
        if not hits:
            raise RecordError(
                "",
                f"no format matches a record with keys {sorted(record)}; "
                f"known formats: {', '.join(sorted(self.formats))}",
            )
        return self.formats[hits[0]]


def make_format(registry: Any, config: Any) -> DatasetFormat:
    """The run's dataset format; ``auto`` tries every registered format by its keys."""
    if config.format != "auto":
        return registry.build("format", config.format, config)
    return AutoFormat({n: registry.build("format", n, config) for n in registry.names("format")})


ROLES = ("system", "user", "assistant", "tool")  # what chat templates render


def check_pair(pair: PreferencePair, field_names: dict[str, str] | None = None) -> None:
    """Checks every format gets for free: a prompt, known roles, no empty completion, responses
    of assistant turns only (tool results belong to the prompt), chosen differs from rejected.
    ``field_names`` maps prompt/chosen/rejected to the record's own field names."""
    names = field_names or {}
    if pair.is_text:
        check_text_pair(pair, names)
        return
    if not pair.prompt:
        raise RecordError(names.get("prompt", "prompt"), "the prompt has no messages")
    for side in ("prompt", "chosen", "rejected"):
        for i, message in enumerate(getattr(pair, side)):
            if message.role not in ROLES:
                raise RecordError(names.get(side, side), (
                    f"message {i} of the {side} has role {message.role!r}; chat templates render "
                    f"{', '.join(ROLES)} turns"))
    for side in ("chosen", "rejected"):
        messages = getattr(pair, side)
        if not messages:
            raise RecordError(names.get(side, side), f"the {side} response has no messages")
        for i, message in enumerate(messages):
            if message.role != "assistant":
                raise RecordError(names.get(side, side), f"the {side} response (message {i}) is a "
                                  f"{message.role!r} turn; a response holds assistant turns only")
            if not message.content.strip() and not message.tool_calls:
                raise RecordError(names.get(side, side), f"the {side} response (message {i}) is empty")
    if pair.chosen == pair.rejected:
        raise RecordError(names.get("rejected", "rejected"), "chosen and rejected responses are identical")


def check_text_pair(pair: PreferencePair, names: dict[str, str]) -> None:
    """A text pair (no chat template): three strings, a prompt, two different completions."""
    for side in ("prompt", "chosen", "rejected"):
        if not isinstance(getattr(pair, side), str):
            raise RecordError(names.get(side, side), "a text pair holds text on every side, not messages")
    if not pair.prompt:
        raise RecordError(names.get("prompt", "prompt"), "the prompt is empty")
    for side in ("chosen", "rejected"):
        if not getattr(pair, side).strip():
            raise RecordError(names.get(side, side), f"the {side} response is empty")
    if pair.chosen == pair.rejected:
        raise RecordError(names.get("rejected", "rejected"), "chosen and rejected responses are identical")


@dataclass
class ParseResult:
    """The pairs of one data set and every problem found in it."""

    pairs: list[PreferencePair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    records: int = 0


def parse_record(record: Any, fmt: DatasetFormat) -> PreferencePair:
    """One record's checked pair; a :class:`RecordError` naming the field otherwise."""
    if not isinstance(record, dict):
        raise RecordError("", f"expected a JSON object, got {type(record).__name__}")
    chosen_format = fmt.select(record) if isinstance(fmt, AutoFormat) else fmt
    pair = chosen_format.parse(record)
    check_pair(pair, getattr(chosen_format, "field_names", None))
    return pair


def parse_records(reads: Iterable[Read], fmt: DatasetFormat, limit: int | None = None) -> ParseResult:
    """Parse and check ``(where, record, error)`` reads, collecting every problem (not just the
    first); reading stops once ``limit`` pairs are good."""
    result = ParseResult()
    for where, record, error in reads:
        if limit and len(result.pairs) >= limit:
            break
        result.records += 1
        try:
            if error is not None:
                raise error
            pair = parse_record(record, fmt)
        except RecordError as exc:
            result.problems.append(Problem(where, exc.field, exc.message, record))
            continue
        result.pairs.append(replace(pair, source=where))
    return result


def parse_file(path: str | Path, fmt: DatasetFormat) -> ParseResult:
    """Parse and check every record of a JSONL (or JSONL.gz) file."""
    return parse_records(read_records(path), fmt)


def load_pairs(path: str | Path, fmt: DatasetFormat) -> list[PreferencePair]:
    """Parse a JSONL file; any bad line is a :class:`DataError` listing all of them."""
    result = parse_file(path, fmt)
    if result.problems:
        raise DataError(result.problems, total=result.records)
    if not result.pairs:
        raise DataError([Problem(str(path), "", "the data set holds no preference pairs")])
    return result.pairs
