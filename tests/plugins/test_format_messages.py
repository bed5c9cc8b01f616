"""Messages as every chat format reads them: names, tool calls, tool results, a record's tools,
keys a chat template would never see, and None read as an absent key (Parquet and hub rows)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from preftune import Message, RecordError
from preftune.plugins.formats import ChosenRejected, InputOutput, TrlConversational, parse_messages

LIGHTS = {"type": "function", "function": {
    "name": "control_light", "description": "Turns the lights of a room on or off.",
    "parameters": {"type": "object", "required": ["room", "state"], "properties": {
        "room": {"type": "string", "description": "The room."},
        "state": {"type": "string", "enum": ["on", "off"]}}}}}
SYSTEM = {"role": "system", "content": "You control a smart home."}
ASK = {"role": "user", "content": "Turn on the living room lights."}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function",
     "function": {"name": "control_light", "arguments": {"room": "living room", "state": "on"}}}]}
RESULT = {"role": "tool", "name": "control_light", "tool_call_id": "call_1",
          "content": "The living room lights are on."}
DONE = {"role": "assistant", "content": "Done: the living room lights are on."}
WRONG = {"role": "assistant", "content": "I cannot do that."}
TOOL_RECORD = {"prompt": [SYSTEM, ASK, CALL, RESULT], "chosen": [DONE], "rejected": [WRONG],
               "tools": [LIGHTS]}


def canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # the record's key order


def test_a_tool_calling_conversation_reaches_the_template_as_given() -> None:
    pair = TrlConversational().parse(TOOL_RECORD)
    call, result = pair.prompt[2], pair.prompt[3]
    assert call == Message("assistant", "", tool_calls=canonical(CALL["tool_calls"]))
    assert result == Message("tool", "The living room lights are on.", name="control_light",
                             tool_call_id="call_1")
    # what the chat template gets back is the record's messages (content None read as "")
    assert [m.as_dict() for m in pair.prompt] == [SYSTEM, ASK, {**CALL, "content": ""}, RESULT]
    assert pair.tools == canonical([LIGHTS]) and json.loads(pair.tools) == [LIGHTS]
    assert pair.chosen == (Message("assistant", "Done: the living room lights are on."),)


def test_tools_and_arguments_as_json_strings_are_read_as_trl_reads_them() -> None:
    as_text = {**TOOL_RECORD, "tools": json.dumps([LIGHTS], indent=2)}
    assert TrlConversational().parse(as_text) == TrlConversational().parse(TOOL_RECORD)
    written = [{**LIGHTS, "strict": None}]  # JSON text is not Arrow-padded: its nulls are meant
    pair = TrlConversational().parse({**TOOL_RECORD, "tools": json.dumps(written)})
    assert json.loads(pair.tools) == written
    arguments = '{"room": "living room", "state": "on"}'
    string_args = {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {
        "name": "control_light", "arguments": arguments}}]}
    message = parse_messages([string_args], "m")[0]
    # kept as given: the template decides how to render a string of arguments
    assert json.loads(message.tool_calls)[0]["function"]["arguments"] == arguments


def test_every_chat_format_reads_tool_turns_and_tools() -> None:
    conversation = [SYSTEM, ASK, CALL, RESULT]
    expected = TrlConversational().parse(TOOL_RECORD)
    whole = {"chosen": conversation + [DONE], "rejected": conversation + [WRONG], "tools": [LIGHTS]}
    cookbook = {"input": {"messages": conversation}, "preferred_output": [DONE],
                "non_preferred_output": [WRONG], "tools": json.dumps([LIGHTS])}
    assert ChosenRejected().parse(whole) == InputOutput().parse(cookbook) == expected
    # a response that is itself a tool call (no content) against a plain answer
    choose_call = {"prompt": [SYSTEM, ASK], "chosen": [{**CALL, "content": ""}], "rejected": [WRONG]}
    assert TrlConversational().parse(choose_call).chosen[0].tool_calls == canonical(CALL["tool_calls"])


def test_none_is_an_absent_key_in_records_messages_and_calls() -> None:
    """Arrow gives every row every struct field: None where a record has none."""
    padded = {"role": None, "content": None, "name": None, "tool_calls": None, "tool_call_id": None,
              "reasoning_content": None, "weight": None}
    arrow_call = {**CALL, "name": None, "tool_call_id": None, "reasoning_content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "index": None, "function": {
            "name": "control_light", "arguments": {"room": "living room", "state": "on", "dim": None}}}]}
    arrow_tool = {"type": "function", "function": {**LIGHTS["function"], "strict": None}}
    record = {"prompt": [{**padded, **SYSTEM}, {**padded, **ASK}, arrow_call, {**padded, **RESULT}],
              "chosen": [{**padded, **DONE}], "rejected": [{**padded, **WRONG}],
              "tools": [arrow_tool], "chat_template_kwargs": None, "id": None}
    assert TrlConversational().parse(record) == TrlConversational().parse(TOOL_RECORD)
    assert TrlConversational().parse({**TOOL_RECORD, "tools": None}).tools is None
    assert TrlConversational().parse({**TOOL_RECORD, "tools": []}).tools is None
    assert parse_messages([{**ASK, "tool_calls": []}], "m")[0].tool_calls is None
    assert parse_messages([{**DONE, "reasoning_content": ""}], "m") == parse_messages([DONE], "m")


@pytest.mark.parametrize(
    ("message", "field", "says"),
    [
        ({**DONE, "weight": 0.0}, "m[0].weight", "not read: the chat template would never see it"),
        ({**DONE, "reasoning_content": "Think."}, "m[0].reasoning_content", "put it in content"),
        ({**DONE, "thinking": " "}, "m[0].thinking", "put it in content"),
        ({**DONE, "weight": ""}, "m[0].weight", "not read"),  # any value, but for reasoning
        ({**DONE, "function_call": {"name": "f", "arguments": "{}"}}, "m[0].function_call", "tool_calls"),
        ({**ASK, "tool_calls": CALL["tool_calls"]}, "m[0].tool_calls", "only a 'assistant' turn"),
        ({**ASK, "tool_call_id": "call_1"}, "m[0].tool_call_id", "only a 'tool' turn"),
        ({**DONE, "name": 3}, "m[0].name", "must be a string"),
        ({**RESULT, "tool_call_id": 1}, "m[0].tool_call_id", "must be a string"),
        ({**DONE, "content": None}, "m[0].content", "missing or not a string"),
        ({**DONE, "content": [{"type": "image"}]}, "m[0].content", "text parts"),
        ({**CALL, "tool_calls": {"function": {}}}, "m[0].tool_calls", "a list of tool calls"),
        ({**CALL, "tool_calls": ["control_light"]}, "m[0].tool_calls[0]", "a tool call object"),
        ({**CALL, "tool_calls": [{"type": "code", "function": {"name": "f", "arguments": {}}}]},
         "m[0].tool_calls[0].type", "must be 'function'"),
        ({**CALL, "tool_calls": [{"id": 1, "function": {"name": "f", "arguments": {}}}]},
         "m[0].tool_calls[0].id", "must be a string"),
        ({**CALL, "tool_calls": [{"name": "f", "arguments": {}}]}, "m[0].tool_calls[0].function",
         "expected an object"),
        ({**CALL, "tool_calls": [{"function": {"arguments": {}}}]}, "m[0].tool_calls[0].function.name",
         "missing"),
        ({**CALL, "tool_calls": [{"function": {"name": "f", "arguments": "{room"}}]},
         "m[0].tool_calls[0].function.arguments", "not valid JSON"),
        ({**CALL, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
         "m[0].tool_calls[0].function.arguments", "expected an object"),
        ({**CALL, "tool_calls": [{"function": {"name": "f"}}]}, "m[0].tool_calls[0].function.arguments",
         "expected an object"),
    ],
)
def test_message_errors_name_the_key(message: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(RecordError) as info:
        parse_messages([message], "m")
    assert info.value.field == field and says in info.value.message


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        ({"type": "function", "function": LIGHTS["function"]}, "tools"),  # one schema, not a list
        ("[{not json", "tools"),
        ([LIGHTS, "control_light"], "tools[1]"),
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0]"),
    ],
)
def test_record_tools_errors_name_the_field(tools: Any, field: str) -> None:
    with pytest.raises(RecordError) as info:
        TrlConversational().parse({**TOOL_RECORD, "tools": tools})
    assert info.value.field == field
