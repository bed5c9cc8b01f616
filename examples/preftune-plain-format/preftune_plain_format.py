"""The ``plain`` dataset format: TRL's "standard" preference records with plain strings::

    {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}

The prompt becomes one user turn and each response one assistant turn, so the tokenizer's chat
template frames them like any chat pair. An optional ``system`` string becomes a system turn.
"""

from __future__ import annotations

from typing import Any

from preftune import Message, PreferencePair, RecordError, hookimpl

KEYS = ("prompt", "chosen", "rejected")


class PlainFormat:
    def matches(self, record: dict[str, Any]) -> bool:
        return all(isinstance(record.get(key), str) for key in KEYS)

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        for key in KEYS:
            if not isinstance(record.get(key), str):
                raise RecordError(key, "missing or not a string")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise RecordError("system", "must be a string")
        prompt = ((Message("system", system),) if system else ()) + (Message("user", record["prompt"]),)
        return PreferencePair(prompt, (Message("assistant", record["chosen"]),),
                              (Message("assistant", record["rejected"]),))


@hookimpl
def register_formats(register: Any) -> None:
    register("plain", lambda config, options: PlainFormat())
