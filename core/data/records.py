"""Records to preference pairs: the format of each record, and the checks every format gets.

Every problem is reported with its location and field; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, RecordError
from ..types import DatasetFormat, PreferencePair
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


ROLES = ("system", "user", "assistant")  # what chat templates render; tool turns are not supported yet


def check_pair(pair: PreferencePair, field_names: dict[str, str] | None = None) -> None:
    """Checks every format gets for free: a prompt, known roles, no empty completion, responses
    of assistant turns only, chosen differs from rejected. ``field_names`` maps
    prompt/chosen/rejected to the record's own field names."""
    names = field_names or {}
    if not pair.prompt:
        raise RecordError(names.get("prompt", "prompt"), "the prompt has no messages")
    for side in ("prompt", "chosen", "rejected"):
        for i, message in enumerate(getattr(pair, side)):
            if message.role not in ROLES:
                raise RecordError(names.get(side, side), (
                    f"message {i} of the {side} has role {message.role!r}; preftune trains on "
                    f"{', '.join(ROLES)} turns (tool calls and results are not supported yet)"))
    for side in ("chosen", "rejected"):
        messages = getattr(pair, side)
        if not messages:
            raise RecordError(names.get(side, side), f"the {side} response has no messages")
        for i, message in enumerate(messages):
            if message.role != "assistant":
                raise RecordError(names.get(side, side), f"the {side} response (message {i}) is a "
                                  f"{message.role!r} turn; a response holds assistant turns only")
            if not message.content.strip():
                raise RecordError(names.get(side, side), f"the {side} response (message {i}) is empty")
    if pair.chosen == pair.rejected:
        raise RecordError(names.get("rejected", "rejected"), "chosen and rejected responses are identical")


@dataclass
class ParseResult:
    """The pairs of one file and every problem found in it."""

    pairs: list[PreferencePair] = field(default_factory=list)
    problems: list[tuple[str, int, str, str]] = field(default_factory=list)
    records: int = 0


def parse_file(path: str | Path, fmt: DatasetFormat) -> ParseResult:
    """Parse and check every record of a dataset file (JSONL, or JSONL.gz), collecting all
    problems (not just the first)."""
    result = ParseResult()
    for where, record, error in read_records(path):
        result.records += 1
        try:
            if error is not None:
                raise error
            if not isinstance(record, dict):
                raise RecordError("", f"expected a JSON object, got {type(record).__name__}")
            chosen_format = fmt.select(record) if isinstance(fmt, AutoFormat) else fmt
            pair = chosen_format.parse(record)
            check_pair(pair, getattr(chosen_format, "field_names", None))
        except RecordError as exc:
            result.problems.append((where.file, where.line, exc.field, exc.message))
            continue
        result.pairs.append(PreferencePair(pair.prompt, pair.chosen, pair.rejected, where))
    return result


def load_pairs(path: str | Path, fmt: DatasetFormat) -> list[PreferencePair]:
    """Parse a dataset file; any bad line is a :class:`DataError` listing all of them."""
    result = parse_file(path, fmt)
    if result.problems:
        raise DataError(result.problems, total=result.records)
    if not result.pairs:
        raise DataError([(str(path), 0, "", "the file holds no preference pairs")])
    return result.pairs
