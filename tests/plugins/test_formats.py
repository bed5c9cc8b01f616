"""The built-in formats: the cookbook's two and TRL's three, each on real records, and
``format = "auto"`` telling all five apart over the real registry."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune import Config, Message, PreferencePair, RecordError, get_plugin_manager, get_registry
from preftune.plugins.formats import (
    ChosenRejected,
    InputOutput,
    TrlConversational,
    TrlImplicit,
    TrlStandard,
    implicit_split,
)

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


# ---- TRL's formats: the records of TRL's dataset-formats guide ----------------------------------

SKY = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}
TRL_STANDARD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
TRL_IMPLICIT = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
TRL_CONVERSATIONAL = {"prompt": [SKY], "chosen": [BLUE], "rejected": [GREEN]}
TRL_CONVERSATIONAL_IMPLICIT = {"chosen": [SKY, BLUE], "rejected": [SKY, GREEN]}
ULTRAFEEDBACK = {  # HuggingFaceH4/ultrafeedback_binarized's columns
    "prompt": "What color is the sky?", "prompt_id": "3c1a", "chosen": [SKY, BLUE],
    "rejected": [SKY, GREEN], "messages": [SKY, BLUE], "score_chosen": 8.0, "score_rejected": 3.5,
}
COOKBOOK_2 = {"input": {"messages": [SKY]}, "preferred_output": [BLUE], "non_preferred_output": [GREEN]}


def test_standard_and_implicit_give_the_text_pair_of_trls_guide() -> None:
    expected = PreferencePair("The sky is", " blue.", " green.")
    assert TrlStandard().parse(TRL_STANDARD) == expected
    assert TrlImplicit().parse(TRL_IMPLICIT) == expected  # the space before the split goes to the completions
    assert expected.is_text


def test_every_conversational_shape_gives_the_same_chat_pair() -> None:
    expected = PreferencePair((Message("user", "What color is the sky?"),),
                              (Message("assistant", "It is blue."),), (Message("assistant", "It is green."),))
    assert TrlConversational().parse(TRL_CONVERSATIONAL) == expected
    assert ChosenRejected().parse(TRL_CONVERSATIONAL_IMPLICIT) == expected
    assert ChosenRejected().parse(ULTRAFEEDBACK) == expected
    assert InputOutput().parse(COOKBOOK_2) == expected


def test_ultrafeedbacks_prompt_column_is_checked_against_the_conversations() -> None:
    record = {**ULTRAFEEDBACK, "prompt": "What colour is grass?"}
    with pytest.raises(RecordError) as info:
        ChosenRejected().parse(record)
    assert info.value.field == "prompt" and "What color is the sky?" in info.value.message
    multi = [{"role": "system", "content": "Be terse."}, SKY, BLUE, {"role": "user", "content": "Sure?"}]
    ok = {"prompt": "Sure?", "chosen": multi + [BLUE], "rejected": multi + [GREEN]}
    assert ChosenRejected().parse(ok).prompt[-1] == Message("user", "Sure?")
    with pytest.raises(RecordError) as info:  # the first user turn is not the stated prompt
        ChosenRejected().parse({**ok, "prompt": "What color is the sky?"})
    assert info.value.field == "prompt"


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt"),
    [
        ("The sky is blue.", "The sky is green.", "The sky is"),  # space before the split: moved
        ("Answer:blue", "Answer:green", "Answer:"),  # no space: the split stays
        ("Q? Yes.", "Q? Yes, sure.", "Q? Yes"),  # first difference at '.' vs ','
        ("ab", "abc", "a"),  # a prefix: TRL's loop ends on the shorter string's last index
        ("Hi  there", "Hi  you", "Hi "),  # only one space moves
    ],
)
def test_implicit_prompt_is_trls_extract_prompt(chosen: str, rejected: str, prompt: str) -> None:
    pair = TrlImplicit().parse({"chosen": chosen, "rejected": rejected})
    assert (pair.prompt, pair.prompt + pair.chosen, pair.prompt + pair.rejected) == (prompt, chosen, rejected)


@settings(deadline=None, max_examples=300)  # the first example imports TRL
@given(st.text(alphabet="ab ", min_size=1, max_size=8), st.text(alphabet="ab ", min_size=1, max_size=8))
def test_implicit_split_agrees_with_trls_own_function(chosen: str, rejected: str) -> None:
    trl = pytest.importorskip("trl")  # the bench extra installs it
    at = implicit_split(chosen, rejected)
    if at <= 0:  # TRL's prompt is empty here, or (split at 0, chosen ending in a space) index -1
        return
    assert trl.extract_prompt({"chosen": chosen, "rejected": rejected}) == {
        "prompt": chosen[:at], "chosen": chosen[at:], "rejected": rejected[at:]}


@pytest.mark.parametrize(
    ("fmt", "record", "field"),
    [
        (TrlStandard(), {**TRL_STANDARD, "prompt": ""}, "prompt"),
        (TrlStandard(), {**TRL_STANDARD, "chosen": "  "}, "chosen"),
        (TrlStandard(), {**TRL_STANDARD, "rejected": None}, "rejected"),
        (TrlStandard(), {**TRL_STANDARD, "rejected": ["no"]}, "rejected"),
        (TrlStandard(), {**TRL_STANDARD, "tools": [{"name": "f"}]}, "tools"),
        (TrlStandard(), {**TRL_STANDARD, "chat_template_kwargs": {"enable_thinking": False}},
         "chat_template_kwargs"),
        (TrlImplicit(), {"chosen": "Blue.", "rejected": "Green."}, "chosen"),  # nothing shared
        (TrlImplicit(), {"chosen": " blue", "rejected": " green"}, "chosen"),  # only a space shared
        (TrlImplicit(), {"chosen": "Hi ", "rejected": "Hi  "}, "chosen"),  # chosen's rest is blank
        (TrlImplicit(), {"chosen": "", "rejected": "x"}, "chosen"),
        (TrlConversational(), {**TRL_CONVERSATIONAL, "prompt": [{"content": "hi"}]}, "prompt[0].role"),
        (TrlConversational(), {**TRL_CONVERSATIONAL, "chosen": [BLUE, {"role": "assistant"}]},
         "chosen[1].content"),
        (TrlConversational(), {"prompt": [SKY], "chosen": [BLUE]}, "rejected"),
        (TrlConversational(), {**TRL_CONVERSATIONAL, "rejected": "It is green."}, "rejected"),
    ],
)
def test_trl_format_errors_name_the_field(fmt: Any, record: dict[str, Any], field: str) -> None:
    with pytest.raises(RecordError) as info:
        fmt.parse(record)
    assert info.value.field == field


# ---- format = "auto" over the real registry ----------------------------------------------------

HH = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."}


def matching(record: dict[str, Any]) -> list[str]:
    """The built-in formats whose ``matches`` takes ``record``: what ``auto`` chooses among."""
    registry = get_registry(get_plugin_manager(load_entrypoints=False))
    config = Config(base_model="builtin:tiny", dataset="x")
    return [n for n in registry.names("format") if registry.build("format", n, config).matches(record)]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (TRL_STANDARD, ["trl_standard"]),
        ({**TRL_STANDARD, "id": 7, "score": 0.5}, ["trl_standard"]),
        (TRL_IMPLICIT, ["trl_implicit"]),
        ({**TRL_IMPLICIT, "prompt": None}, ["trl_implicit"]),  # a Parquet row's absent prompt
        (HH, ["trl_implicit"]),  # with preftune-hh-format installed, hh_rlhf too: set format
        (TRL_CONVERSATIONAL, ["trl_conversational"]),
        (TRL_CONVERSATIONAL_IMPLICIT, ["chosen_rejected"]),
        ({"chosen": {"messages": [SKY, BLUE]}, "rejected": {"messages": [SKY, GREEN]}}, ["chosen_rejected"]),
        (ULTRAFEEDBACK, ["chosen_rejected"]),
        ({**ULTRAFEEDBACK, "prompt": None}, ["chosen_rejected"]),
        (COOKBOOK_2, ["input_output"]),
        ({"input": "Hi", "preferred_output": "Hello.", "non_preferred_output": "Go."}, ["input_output"]),
        ({"preferred_output": "Hello.", "non_preferred_output": "Go."}, ["input_output"]),  # parse: input
        ({"text": "The sky is blue."}, []),  # TRL language modeling
        ({"prompt": "The sky is", "completion": " blue."}, []),  # TRL prompt-completion
        ({"prompt": "The sky is", "completion": " blue.", "label": True}, []),  # TRL unpaired
        ({"prompt": [SKY], "chosen": "It is blue.", "rejected": "It is green."}, []),  # mixed
        ({"prompt": "x", "chosen": [BLUE], "rejected": "It is green."}, []),
        ({"prompt": 3, "chosen": [SKY, BLUE], "rejected": [SKY, GREEN]}, []),
        ({"chosen": "The sky is blue."}, []),
        ({"chosen": 1, "rejected": 2}, []),
        ({"prompt": None, "chosen": None, "rejected": None}, []),
    ],
)
def test_auto_tells_the_formats_apart_by_shape(record: dict[str, Any], expected: list[str]) -> None:
    assert matching(record) == expected


def test_auto_parses_each_shape_through_the_core(tmp_path: Any) -> None:
    """The core's AutoFormat over the real registry picks the one format, or names the keys."""
    from preftune.data import make_format

    registry = get_registry(get_plugin_manager(load_entrypoints=False))
    auto = make_format(registry, Config(base_model="builtin:tiny", dataset="x", format="auto"))
    assert auto.parse(TRL_IMPLICIT) == auto.parse(TRL_STANDARD)
    assert auto.parse(ULTRAFEEDBACK) == auto.parse(TRL_CONVERSATIONAL) == auto.parse(COOKBOOK_2)
    with pytest.raises(RecordError, match=r"no format matches a record with keys \['completion', 'prompt'\]"):
        auto.parse({"prompt": "The sky is", "completion": " blue."})
