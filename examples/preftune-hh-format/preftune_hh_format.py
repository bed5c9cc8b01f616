"""The ``hh_rlhf`` dataset format: Anthropic's HH-RLHF transcripts as chat pairs::

    {"chosen": "\\n\\nHuman: Hi?\\n\\nAssistant: Hello! How can I help?",
     "rejected": "\\n\\nHuman: Hi?\\n\\nAssistant: Go away."}

Each ``\\n\\nHuman:`` turn becomes a user message and each ``\\n\\nAssistant:`` turn an assistant
message (text stripped). The turns before the final assistant turn are the prompt, which chosen
and rejected must share; the final assistant turn is the response. Text before the first turn
marker is refused, so is a transcript that does not end with the assistant.
"""

from __future__ import annotations

import re
from typing import Any

from preftune import Message, PreferencePair, RecordError, hookimpl

TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}
SIDES = ("chosen", "rejected")


def is_transcript(value: Any) -> bool:
    """A string holding both turn markers."""
    return isinstance(value, str) and "\n\nHuman:" in value and "\n\nAssistant:" in value


def transcript(record: dict[str, Any], field: str) -> tuple[Message, ...]:
    """The turns of ``record[field]`` as messages."""
    text = record.get(field)
    if not isinstance(text, str):
        raise RecordError(field, "missing or not a string")
    parts = TURN.split(text)  # [before, speaker, body, speaker, body, ...]
    if parts[0]:
        raise RecordError(field, "text outside a '\\n\\nHuman:' or '\\n\\nAssistant:' turn: "
                          f"{parts[0][:40]!r}")
    turns = zip(parts[1::2], parts[2::2])
    messages = tuple(Message(ROLES[speaker], body.strip()) for speaker, body in turns)
    if not messages or messages[-1].role != "assistant":
        raise RecordError(field, "the transcript must end with an '\\n\\nAssistant:' turn")
    return messages


class HHFormat:
    """Anthropic HH-RLHF: two transcripts that differ in the final assistant turn."""

    def matches(self, record: dict[str, Any]) -> bool:
        return record.get("prompt") is None and all(is_transcript(record.get(k)) for k in SIDES)

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        chosen, rejected = transcript(record, "chosen"), transcript(record, "rejected")
        if chosen[:-1] != rejected[:-1]:
            at = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                      min(len(chosen), len(rejected)) - 1)
            raise RecordError("rejected", f"turn {at} differs from chosen's: the turns before the final "
                              "Assistant turn are the shared prompt")
        return PreferencePair(chosen[:-1], chosen[-1:], rejected[-1:])


@hookimpl
def register_formats(register: Any) -> None:
    register("hh_rlhf", lambda config, options: HHFormat())
