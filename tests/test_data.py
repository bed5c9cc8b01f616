"""Reading, checking and tokenizing data: every bad input gets file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from preftune import Config, DataError, Message, PreferencePair, Source, tokenize_pair
from preftune.data import (
    epoch_order,
    length_batches,
    load_pairs,
    make_format,
    split_eval,
    tokenize_pairs,
)


def fmt(registry: Any, name: str = "auto") -> Any:
    return make_format(registry, Config(base_model="builtin:tiny", dataset="x", format=name))


def problems_of(path: Path, registry: Any) -> list[tuple[str, int, str, str]]:
    with pytest.raises(DataError) as info:
        load_pairs(path, fmt(registry))
    return info.value.problems


def test_every_bad_line_is_reported_with_file_line_and_field(
    tmp_path: Path, registry: Any, pair_record: Any, write_jsonl: Any
) -> None:
    good = pair_record("Hi?", "Hello.", "Go away.")
    mismatched = json.loads(json.dumps(pair_record("Hi?", "Hello.", "Go away.")))
    mismatched["rejected"]["messages"][0]["content"] = "Bye?"
    empty = pair_record("Hi?", "Hello.", "   ")
    same = pair_record("Hi?", "Hello.", "Hello.")
    no_assistant = {"chosen": {"messages": [{"role": "user", "content": "x"}]},
                    "rejected": {"messages": [{"role": "user", "content": "x"}]}}
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good, "{not json", mismatched, empty, "", same, no_assistant, "[1, 2]",
        {"prompt": "x", "answer": "y"}, {"input": "q", "preferred_output": "a"},
    ])
    problems = {line: (field, message) for _, line, field, message in problems_of(path, registry)}
    assert set(problems) == {2, 3, 4, 6, 7, 8, 9, 10}
    assert "malformed JSON" in problems[2][1]
    assert problems[3][0] == "rejected.messages[0]" and "prompt" in problems[3][1]
    assert problems[4] == ("rejected.messages", "the rejected response (message 0) is empty")
    assert problems[6] == ("rejected.messages", "chosen and rejected responses are identical")
    assert problems[7][0] == "chosen.messages[0].role"
    assert "expected a JSON object" in problems[8][1]
    assert "no format matches" in problems[9][1] and "chosen_rejected" in problems[9][1]
    assert "no format matches" in problems[10][1]
    with pytest.raises(DataError) as info:
        load_pairs(path, fmt(registry))
    text = str(info.value)
    assert text.startswith("8 bad record(s) of 9")  # blank lines are not records
    assert f"{path}:3: field 'rejected.messages[0]'" in text


def test_explicit_format_names_the_missing_field(
    tmp_path: Path, registry: Any, write_jsonl: Any
) -> None:
    path = write_jsonl(tmp_path / "f2.jsonl", [{"input": "q", "preferred_output": "a"}])
    with pytest.raises(DataError, match=r"f2\.jsonl:1: field 'non_preferred_output': missing"):
        load_pairs(path, fmt(registry, "input_output"))


def test_missing_file_is_a_clear_error(registry: Any) -> None:
    from preftune import ConfigError

    with pytest.raises(ConfigError, match="cannot read dataset /nope.jsonl"):
        load_pairs("/nope.jsonl", fmt(registry))


def pair(prompt: str, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair((Message("user", prompt),), (Message("assistant", chosen),),
                          (Message("assistant", rejected),), Source("d.jsonl", 7))


def test_tokenize_masks_exactly_the_prompt_rendered_by_the_chat_template(tokenizer: Any) -> None:
    p = pair("What is red?", "A color.", "A fish, obviously.")
    t = tokenize_pair(tokenizer, p, max_seq_len=256)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is red?"}],
                                           add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is red?"}, {"role": "assistant", "content": "A color."}]
    )["input_ids"]
    assert list(t.prompt) == prompt and list(t.prompt + t.chosen) == full
    assert tokenizer.decode(t.chosen).startswith("A color.")
    assert t.chosen_weights == (1.0,) * len(t.chosen)
    tokens, weights = t.sequence("rejected")
    assert len(weights) == len(tokens) - 1
    assert weights == [0.0] * (len(t.prompt) - 1) + [1.0] * len(t.rejected)


def test_multi_turn_loss_boundary_is_the_prompt_not_the_common_prefix(tokenizer: Any) -> None:
    """Chosen and rejected share their first words; those words still count in the loss."""
    turns = (Message("user", "a"), Message("assistant", "b"), Message("user", "c"))
    p = PreferencePair(turns, (Message("assistant", "Same start, good"),),
                       (Message("assistant", "Same start, bad"),))
    t = tokenize_pair(tokenizer, p, max_seq_len=256)
    assert tokenizer.decode(t.chosen).startswith("Same start")
    assert tokenizer.decode(t.rejected).startswith("Same start")


def test_overlong_pairs_are_truncated_or_dropped_and_reported(tokenizer: Any) -> None:
    short = pair("Hi", "Yes.", "No.")
    long_answer = pair("Hi", "word " * 40, "No.")
    long_prompt = pair("word " * 60, "Yes.", "No.")
    out, report = tokenize_pairs(tokenizer, [short, long_answer, long_prompt], max_seq_len=30)
    assert len(out) == 2 and not out[0].truncated and out[1].truncated
    assert len(out[1].prompt) + len(out[1].chosen) == 30
    assert report.dropped == [Source("d.jsonl", 7)] and len(report.truncated) == 1
    lines = report.lines(30)
    assert any("1 pair(s) dropped" in line and "d.jsonl:7" in line for line in lines)
    assert any("1 pair(s) truncated" in line for line in lines)


def test_template_that_does_not_render_a_prefix_is_rejected(tokenizer: Any) -> None:
    class Reordering:
        chat_template = "x"

        def apply_chat_template(self, messages: Any, tokenize: bool, add_generation_prompt: bool):
            base = [len(m["content"]) for m in messages]
            return {"input_ids": base[::-1] + ([9] if add_generation_prompt else [])}

    with pytest.raises(DataError, match=r"d\.jsonl:7: field 'chosen': the chat template"):
        tokenize_pairs(Reordering(), [pair("Hi", "Hello.", "No.")], max_seq_len=30)


def test_split_and_epoch_order_are_pure_functions_of_seed() -> None:
    train, held = split_eval(100, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert split_eval(100, 0.1, seed=3) == (train, held)
    assert split_eval(100, 0.1, seed=4) != (train, held)
    assert split_eval(100, 0.0, seed=3) == (list(range(100)), [])
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)
    assert sorted(epoch_order(50, 1, 2)) == list(range(50))


def test_length_batches_cover_indices_and_sort_by_length(tokenizer: Any) -> None:
    pairs, _ = tokenize_pairs(tokenizer, [pair("x" * n, "Yes.", "No.") for n in (9, 1, 5, 3)],
                              max_seq_len=99)
    batches = length_batches(pairs, [0, 1, 2, 3], 3)
    assert batches == [[1, 3, 2], [0]]


def test_bundled_demo_data_is_clean(registry: Any) -> None:
    from preftune.tiny import demo_data

    for split in ("train", "heldout"):
        assert load_pairs(demo_data(split), fmt(registry))
    first = json.loads(demo_data("heldout").read_text().splitlines()[0])
    assert "preferred_output" in first


def test_core_checks_name_the_fields_of_format_2(
    tmp_path: Path, registry: Any, write_jsonl: Any
) -> None:
    path = write_jsonl(tmp_path / "f2.jsonl", [
        {"input": "q", "preferred_output": "yes", "non_preferred_output": " "},
        {"input": "q", "preferred_output": "same", "non_preferred_output": "same"},
    ])
    problems = problems_of(path, registry)
    assert [(p[1], p[2]) for p in problems] == [(1, "non_preferred_output"),
                                                (2, "non_preferred_output")]
