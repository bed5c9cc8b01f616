"""The cookbook's two dataset formats."""

from __future__ import annotations

from typing import Any

import pytest

from preftune import Message, RecordError
from preftune.plugins.formats import ChosenRejected, InputOutput

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Name a fruit."}
GOOD = {"role": "assistant", "content": "An apple."}
BAD = {"role": "assistant", "content": "A chair."}


def test_both_formats_parse_to_identical_pairs() -> None:
    f1 = {"chosen": {"messages": [SYSTEM, USER, GOOD]}, "rejected": {"messages": [SYSTEM, USER, BAD]}}
    f2 = {"input": {"messages": [SYSTEM, USER]}, "preferred_output": [GOOD],
          "non_preferred_output": [BAD]}
    a, b = ChosenRejected().parse(f1), InputOutput().parse(f2)
    assert a == b
    assert a.prompt == (Message("system", "Be brief."), Message("user", "Name a fruit."))
    assert a.chosen == (Message("assistant", "An apple."),)
    assert ChosenRejected().matches(f1) and not ChosenRejected().matches(f2)
    assert InputOutput().matches(f2) and not InputOutput().matches(f1)


def test_format2_accepts_strings_and_lists_like_the_cookbook() -> None:
    as_strings = {"input": "Name a fruit.", "preferred_output": "An apple.",
                  "non_preferred_output": "A chair."}
    as_lists = {"input": [USER], "preferred_output": [GOOD], "non_preferred_output": [BAD]}
    assert InputOutput().parse(as_strings) == InputOutput().parse(as_lists)


def test_format1_accepts_bare_message_lists_and_text_parts() -> None:
    parts = {"role": "assistant", "content": [{"type": "text", "text": "An "},
                                              {"type": "text", "text": "apple."}]}
    bare = {"chosen": [USER, parts], "rejected": [USER, BAD]}
    assert ChosenRejected().parse(bare).chosen == (Message("assistant", "An apple."),)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"chosen": {"messages": [USER, GOOD]}}, "rejected"),
        ({"chosen": {"msgs": []}, "rejected": {"messages": [USER, BAD]}}, "chosen"),
        ({"chosen": {"messages": [USER, GOOD]}, "rejected": {"messages": "x"}},
         "rejected.messages"),
        ({"chosen": {"messages": [USER, {"role": "assistant"}]},
          "rejected": {"messages": [USER, BAD]}}, "chosen.messages[1].content"),
        ({"chosen": {"messages": [USER, GOOD, USER]}, "rejected": {"messages": [USER, BAD]}},
         "chosen.messages[2].role"),
        ({"chosen": {"messages": [USER, GOOD]}, "rejected": {"messages": [SYSTEM, USER, BAD]}},
         "rejected.messages[0]"),
    ],
)
def test_format1_errors_name_the_field(record: dict[str, Any], field: str) -> None:
    with pytest.raises(RecordError) as info:
        ChosenRejected().parse(record)
    assert info.value.field == field


def test_format2_output_must_end_with_assistant() -> None:
    record = {"input": "q", "preferred_output": [USER], "non_preferred_output": "no"}
    with pytest.raises(RecordError) as info:
        InputOutput().parse(record)
    assert info.value.field == "preferred_output[0].role"
