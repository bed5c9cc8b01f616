"""The two dataset formats of the Fireworks cookbook's DPO recipe.

``chosen_rejected`` (Format 1)::

    {"chosen": {"messages": [..., {"role": "assistant", ...}]},
     "rejected": {"messages": [..., {"role": "assistant", ...}]}}

``input_output`` (Format 2)::

    {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
     "non_preferred_output": [{"role": "assistant", ...}]}

In Format 2, ``input`` may also be a list of messages or a string (one user turn), and each output
a list of messages or a string (one assistant turn), as the cookbook accepts.
"""

from __future__ import annotations

from typing import Any

from preftune import Config, Message, PreferencePair, RecordError, hookimpl

REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def parse_messages(value: Any, field: str) -> tuple[Message, ...]:
    """A list of ``{"role", "content"}`` objects as Messages; content may be text parts."""
    if not isinstance(value, list):
        raise RecordError(field, f"expected a list of messages, got {type(value).__name__}")
    messages = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise RecordError(where, f"expected a message object, got {type(item).__name__}")
        role, content = item.get("role"), item.get("content")
        for key in ("tool_calls", "function_call"):
            if item.get(key):
                raise RecordError(f"{where}.{key}", "tool calls are not supported yet; the chat "
                                  "template would drop them from what is trained")
        for key in REASONING_KEYS:  # text that chat templates render, which a Message cannot hold
            if item.get(key):
                raise RecordError(f"{where}.{key}", "reasoning text beside content is not read yet "
                                  "(it would be dropped from what is trained): put it in content, "
                                  "or remove it")
        if not isinstance(role, str) or not role:
            raise RecordError(f"{where}.role", "missing or not a string")
        if isinstance(content, list):  # OpenAI-style [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
                raise RecordError(f"{where}.content", "content parts must be text parts")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RecordError(f"{where}.content", "missing or not a string")
        messages.append(Message(role, content))
    return tuple(messages)


def split_last_assistant(messages: tuple[Message, ...], field: str) -> tuple[tuple, tuple]:
    """Split a conversation into the prompt and its final assistant turn."""
    if not messages:
        raise RecordError(field, "no messages")
    if messages[-1].role != "assistant":
        raise RecordError(f"{field}[{len(messages) - 1}].role",
                          f"the last message must be the assistant's, got {messages[-1].role!r}")
    return messages[:-1], messages[-1:]


def conversation(record: dict[str, Any], key: str) -> tuple[Message, ...]:
    value = record[key]
    if isinstance(value, dict):
        if "messages" not in value:
            raise RecordError(key, "expected an object with a 'messages' list")
        return parse_messages(value["messages"], f"{key}.messages")
    return parse_messages(value, key)


class ChosenRejected:
    """Format 1: two whole conversations that share every message but the last."""

    field_names = {"prompt": "chosen.messages", "chosen": "chosen.messages",
                   "rejected": "rejected.messages"}

    def matches(self, record: dict[str, Any]) -> bool:
        # conversations, not plain strings (TRL's "standard" format uses the same key names)
        return all(isinstance(record.get(k), (dict, list)) for k in ("chosen", "rejected"))

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        for key in ("chosen", "rejected"):
            if key not in record:
                raise RecordError(key, "missing")
        prompt, chosen = split_last_assistant(conversation(record, "chosen"), "chosen.messages")
        other, rejected = split_last_assistant(
            conversation(record, "rejected"), "rejected.messages"
        )
        if prompt != other:
            at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b),
                      min(len(prompt), len(other)))
            raise RecordError(
                f"rejected.messages[{at}]",
                "the prompt (all messages before the final assistant turn) differs between "
                "chosen and rejected; that corrupts the preference signal",
            )
        return PreferencePair(prompt, chosen, rejected)


def as_messages(value: Any, field: str, role: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        return (Message(role, value),)
    if isinstance(value, dict) and "messages" in value:
        return parse_messages(value["messages"], f"{field}.messages")
    return parse_messages(value, field)


class InputOutput:
    """Format 2: a shared input and two alternative outputs."""

    keys = ("input", "preferred_output", "non_preferred_output")
    field_names = {"prompt": "input", "chosen": "preferred_output", "rejected": "non_preferred_output"}

    def matches(self, record: dict[str, Any]) -> bool:
        return "preferred_output" in record and "non_preferred_output" in record

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        for key in self.keys:
            if key not in record:
                raise RecordError(key, "missing")
        prompt = as_messages(record["input"], "input", "user")
        chosen = as_messages(record["preferred_output"], "preferred_output", "assistant")
        rejected = as_messages(record["non_preferred_output"], "non_preferred_output", "assistant")
        for key, messages in (("preferred_output", chosen), ("non_preferred_output", rejected)):
            if messages and messages[-1].role != "assistant":
                raise RecordError(f"{key}[{len(messages) - 1}].role",
                                  "the last output message must be the assistant's")
        return PreferencePair(prompt, chosen, rejected)


def _chosen_rejected(config: Config, options: None) -> ChosenRejected:
    return ChosenRejected()


def _input_output(config: Config, options: None) -> InputOutput:
    return InputOutput()


@hookimpl
def register_formats(register: Any) -> None:
    register("chosen_rejected", _chosen_rejected)
    register("input_output", _input_output)
