"""The built-in dataset formats: the Fireworks cookbook's two and TRL's preference formats.

``chosen_rejected`` (cookbook Format 1; TRL's conversational implicit prompt)::

    {"chosen": {"messages": [..., {"role": "assistant", ...}]},
     "rejected": {"messages": [..., {"role": "assistant", ...}]}}

    ``chosen``/``rejected`` may also be bare message lists, and a string ``prompt`` beside them
    (UltraFeedback-binarized) must equal the extracted prompt's last user turn.

``input_output`` (cookbook Format 2)::

    {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
     "non_preferred_output": [{"role": "assistant", ...}]}

    ``input`` may also be a list of messages or a string (one user turn), and each output a list
    of messages or a string (one assistant turn), as the cookbook accepts.

``trl_standard``: ``{"prompt": str, "chosen": str, "rejected": str}``, a text pair (no template).

``trl_conversational``: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``.

``trl_implicit``: ``{"chosen": str, "rejected": str}``, a text pair whose prompt is the longest
common prefix, as TRL's ``extract_prompt`` computes it.

A key whose value is None is an absent key everywhere (Parquet and hub records carry every
column of the schema, None where a record has none). Messages, tool calls and the record-level
``tools`` list are read by :func:`parse_messages` and :func:`parse_tools`.
"""

from __future__ import annotations

import json
from typing import Any

from preftune import Config, Message, PreferencePair, RecordError, hookimpl

MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
UNREAD = "not read: the chat template would never see it"
UNREAD_HINTS = {  # message keys that are not read, with what to do instead
    **{key: ("reasoning text beside content is not read yet (it would be dropped from what is "
             "trained): put it in content, or remove it") for key in REASONING_KEYS},
    "function_call": f"{UNREAD}; the legacy OpenAI function_call: write it as tool_calls",
}
ROLE_OF_KEY = {"tool_calls": "assistant", "tool_call_id": "tool"}  # keys only one role may carry
REFUSED_RECORD_KEYS = {  # record-level keys TRL reads: ignoring them would change what is trained
    "chat_template_kwargs": f"{UNREAD}: per-record template arguments are not supported",
}


def canonical(value: Any) -> str:
    """The JSON text ``Message.tool_calls`` and ``PreferencePair.tools`` hold: compact, keys in
    the record's order (a template's ``tojson`` writes them as the model will see them)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def without_none(value: Any) -> Any:
    """``value`` with every None-valued object key removed, at any depth (Arrow's unified
    structs fill the keys a record lacks with None)."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


def check_record_keys(record: dict[str, Any]) -> None:
    """Refuse a record-level key that would change the rendering if it were read."""
    for key, reason in REFUSED_RECORD_KEYS.items():
        if record.get(key) is not None:
            raise RecordError(key, reason)


# ---- messages ----------------------------------------------------------------------------------

def parse_messages(value: Any, field: str) -> tuple[Message, ...]:
    """A list of message objects as Messages (see :func:`parse_message`)."""
    if not isinstance(value, list):
        raise RecordError(field, f"expected a list of messages, got {type(value).__name__}")
    return tuple(parse_message(item, f"{field}[{i}]") for i, item in enumerate(value))


def parse_message(item: Any, where: str) -> Message:
    """One ``{"role", "content", "name"?, "tool_calls"?, "tool_call_id"?}`` object. Content may
    be OpenAI text parts, and None or "" on an assistant turn with tool calls; any other key is
    refused, since the chat template would never see it."""
    if not isinstance(item, dict):
        raise RecordError(where, f"expected a message object, got {type(item).__name__}")
    refuse_unread_keys(item, where)
    role = item.get("role")
    if not isinstance(role, str) or not role:
        raise RecordError(f"{where}.role", "missing or not a string")
    for key, owner in ROLE_OF_KEY.items():
        if item.get(key) not in (None, []) and role != owner:
            raise RecordError(f"{where}.{key}", f"only a {owner!r} turn carries {key}, not a {role!r} turn")
    tool_calls = parse_tool_calls(item.get("tool_calls"), f"{where}.tool_calls")
    content = parse_content(item.get("content"), f"{where}.content", tool_calls is not None)
    return Message(role, content, optional_str(item, "name", where), tool_calls,
                   optional_str(item, "tool_call_id", where))


def refuse_unread_keys(item: dict[str, Any], where: str) -> None:
    """A RecordError for the first key a Message cannot carry that holds something."""
    for key, value in item.items():
        if key not in MESSAGE_KEYS and holds(key, value):
            raise RecordError(f"{where}.{key}", UNREAD_HINTS.get(key, UNREAD))


def holds(key: str, value: Any) -> bool:
    """Whether a message key holds something: not None, and for reasoning not "" (an empty
    reasoning text drops nothing; exports from chat APIs put one on every turn)."""
    return value is not None and not (key in REASONING_KEYS and value == "")


def optional_str(item: dict[str, Any], key: str, where: str) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise RecordError(f"{where}.{key}", f"must be a string, got {type(value).__name__}")
    return value


def parse_content(content: Any, where: str, has_tool_calls: bool) -> str:
    """Text, or OpenAI text parts joined; None only beside tool calls (read as "")."""
    if content is None and has_tool_calls:
        return ""
    if isinstance(content, list):  # OpenAI-style [{"type": "text", "text": ...}]
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
            raise RecordError(where, "content parts must be text parts")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RecordError(where, "missing or not a string")
    return content


def parse_tool_calls(value: Any, where: str) -> str | None:
    """A message's ``tool_calls`` as canonical JSON text; None when absent or empty. Each call
    is kept as given (None-valued keys removed), once its shape is checked."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise RecordError(where, f"expected a list of tool calls, got {type(value).__name__}")
    return canonical([check_tool_call(call, f"{where}[{j}]") for j, call in enumerate(value)])


def check_tool_call(call: Any, where: str) -> dict[str, Any]:
    """``{"type": "function", "id"?: str, "function": {"name": str, "arguments": ...}}``."""
    if not isinstance(call, dict):
        raise RecordError(where, f"expected a tool call object, got {type(call).__name__}")
    call = without_none(call)
    if call.get("type", "function") != "function":
        raise RecordError(f"{where}.type", f"must be 'function', got {call['type']!r}")
    if not isinstance(call.get("id", ""), str):
        raise RecordError(f"{where}.id", "must be a string")
    function = call.get("function")
    if not isinstance(function, dict):
        raise RecordError(f"{where}.function", "expected an object {\"name\": ..., \"arguments\": ...}")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise RecordError(f"{where}.function.name", "missing or not a string")
    check_arguments(function.get("arguments"), f"{where}.function.arguments")
    return call


def check_arguments(arguments: Any, where: str) -> None:
    """A call's arguments: an object, or a JSON string of one (kept as given)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise RecordError(where, f"not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise RecordError(where, "expected an object (or a JSON string of one)")


def parse_tools(record: dict[str, Any]) -> str | None:
    """The record-level ``tools`` (a list of function schemas, or a JSON string of that list, as
    TRL reads it) as canonical JSON text; None when absent or empty."""
    value = record.get("tools")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise RecordError("tools", f"not valid JSON: {exc}") from None
    else:
        value = without_none(value)
    if not isinstance(value, list):
        raise RecordError("tools", "expected a list of tool schemas (or a JSON string of one)")
    for k, tool in enumerate(value):
        schema = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise RecordError(f"tools[{k}]", "expected a function schema with a name: "
                              "{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}")
    return canonical(value) if value else None


def chat_pair(record: dict[str, Any], prompt: tuple, chosen: tuple, rejected: tuple) -> PreferencePair:
    """A chat pair carrying the record's tools."""
    return PreferencePair(prompt, chosen, rejected, tools=parse_tools(record))


# ---- the cookbook's formats --------------------------------------------------------------------

def split_last_assistant(messages: tuple[Message, ...], field: str) -> tuple[tuple, tuple]:
    """Split a conversation into the prompt and its final assistant turn."""
    if not messages:
        raise RecordError(field, "no messages")
    if messages[-1].role != "assistant":
        raise RecordError(f"{field}[{len(messages) - 1}].role",
                          f"the last message must be the assistant's, got {messages[-1].role!r}")
    return messages[:-1], messages[-1:]


def conversation(record: dict[str, Any], key: str) -> tuple[tuple[Message, ...], str]:
    """The messages of ``record[key]`` (a list, or an object with a ``messages`` list) and the
    field they were read from."""
    value = record[key]
    if isinstance(value, dict):
        if value.get("messages") is None:
            raise RecordError(key, "expected an object with a 'messages' list")
        return parse_messages(value["messages"], f"{key}.messages"), f"{key}.messages"
    return parse_messages(value, key), key


def require(record: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A RecordError for the first of ``keys`` that is absent (or None)."""
    for key in keys:
        if record.get(key) is None:
            raise RecordError(key, "missing")


def is_conversation(value: Any) -> bool:
    return isinstance(value, (list, dict))


class ChosenRejected:
    """Two whole conversations that share every message but the last (the cookbook's Format 1
    and TRL's conversational implicit prompt); a string ``prompt`` beside them is checked."""

    field_names = {"prompt": "chosen.messages", "chosen": "chosen.messages",
                   "rejected": "rejected.messages"}

    def matches(self, record: dict[str, Any]) -> bool:
        # conversations, not strings (trl_implicit); a listed prompt is trl_conversational
        return (is_conversation(record.get("chosen")) and is_conversation(record.get("rejected"))
                and isinstance(record.get("prompt"), (str, type(None))))

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        require(record, ("chosen", "rejected"))
        check_record_keys(record)
        messages, field = conversation(record, "chosen")
        prompt, chosen = split_last_assistant(messages, field)
        messages, other_field = conversation(record, "rejected")
        other, rejected = split_last_assistant(messages, other_field)
        if prompt != other:
            at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b),
                      min(len(prompt), len(other)))
            raise RecordError(
                f"{other_field}[{at}]",
                "the prompt (all messages before the final assistant turn) differs between "
                "chosen and rejected; that corrupts the preference signal",
            )
        check_stated_prompt(record.get("prompt"), prompt)
        return chat_pair(record, prompt, chosen, rejected)


def check_stated_prompt(stated: Any, prompt: tuple[Message, ...]) -> None:
    """A string ``prompt`` beside whole conversations (UltraFeedback-binarized) must be the
    extracted prompt's last user turn: anything else means the columns disagree."""
    if stated is None:
        return
    if not isinstance(stated, str):
        raise RecordError("prompt", "expected a string beside whole conversations, "
                          f"got {type(stated).__name__}")
    users = [m.content for m in prompt if m.role == "user"]
    if not users or users[-1] != stated:
        last = repr(users[-1][:60]) if users else "none"
        raise RecordError("prompt", "differs from the last user turn of the conversations' shared "
                          f"prompt (that turn: {last}); the record's columns disagree")


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
        # its own output keys; parse names a missing input
        return all(isinstance(record.get(k), (str, list, dict)) for k in self.keys[1:])

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        require(record, self.keys)
        check_record_keys(record)
        prompt = as_messages(record["input"], "input", "user")
        chosen = as_messages(record["preferred_output"], "preferred_output", "assistant")
        rejected = as_messages(record["non_preferred_output"], "non_preferred_output", "assistant")
        for key, messages in (("preferred_output", chosen), ("non_preferred_output", rejected)):
            if messages and messages[-1].role != "assistant":
                raise RecordError(f"{key}[{len(messages) - 1}].role",
                                  "the last output message must be the assistant's")
        return chat_pair(record, prompt, chosen, rejected)


# ---- TRL's formats -----------------------------------------------------------------------------

class TrlConversational:
    """TRL's conversational preference record: the prompt's messages and each response's."""

    def matches(self, record: dict[str, Any]) -> bool:
        return all(isinstance(record.get(k), list) for k in ("prompt", "chosen", "rejected"))

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        require(record, ("prompt", "chosen", "rejected"))
        check_record_keys(record)
        return chat_pair(record, *(parse_messages(record[k], k) for k in ("prompt", "chosen", "rejected")))


def text(record: dict[str, Any], key: str) -> str:
    """``record[key]``, a string holding more than whitespace."""
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(key, "missing or not a string")
    if not value.strip():
        raise RecordError(key, "empty")
    return value


def text_pair(record: dict[str, Any], prompt: str, chosen: str, rejected: str) -> PreferencePair:
    """A text pair; ``tools`` has no template to go to there."""
    check_record_keys(record)
    if record.get("tools") is not None:
        raise RecordError("tools", "a text record is tokenized without a chat template, so tools "
                          "would never be seen; use a conversational format")
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise RecordError(key, "empty")
    return PreferencePair(prompt, chosen, rejected)


class TrlStandard:
    """TRL's standard preference record: three strings, tokenized without a chat template."""

    def matches(self, record: dict[str, Any]) -> bool:
        return all(isinstance(record.get(k), str) for k in ("prompt", "chosen", "rejected"))

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        return text_pair(record, *(text(record, k) for k in ("prompt", "chosen", "rejected")))


def implicit_split(chosen: str, rejected: str) -> int:
    """Where TRL's ``extract_prompt`` ends the prompt: at the first differing character, one
    earlier when the character before it is a space (the space starts the completions); at the
    last character of the shorter string when one is a prefix of the other (TRL's loop ends on
    its last index without a break)."""
    n = min(len(chosen), len(rejected))
    at = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if at is None:
        return n - 1
    return at - 1 if at > 0 and chosen[at - 1] == " " else at


class TrlImplicit:
    """TRL's standard record with an implicit prompt: the longest common prefix of two strings."""

    field_names = {"prompt": "chosen"}

    def matches(self, record: dict[str, Any]) -> bool:
        return (record.get("prompt") is None
                and all(isinstance(record.get(k), str) for k in ("chosen", "rejected")))

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        chosen, rejected = text(record, "chosen"), text(record, "rejected")
        at = implicit_split(chosen, rejected)
        if at <= 0 or not chosen[:at].strip():
            raise RecordError("chosen", "chosen and rejected share no prefix to take as the prompt "
                              "(TRL's implicit prompt); give the prompt as its own field")
        return text_pair(record, chosen[:at], chosen[at:], rejected[at:])


FORMATS = {
    "chosen_rejected": ChosenRejected,
    "input_output": InputOutput,
    "trl_standard": TrlStandard,
    "trl_conversational": TrlConversational,
    "trl_implicit": TrlImplicit,
}


def _factory(cls: type) -> Any:
    def build(config: Config, options: None) -> Any:
        return cls()
    build.__doc__ = cls.__doc__
    return build


@hookimpl
def register_formats(register: Any) -> None:
    for name, cls in FORMATS.items():
        register(name, _factory(cls))
