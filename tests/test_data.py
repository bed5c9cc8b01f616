"""Reading, checking and tokenizing data: every bad input gets file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from preftune import Config, DataError, Message, PreferencePair, RecordError, Source, tokenize_pair
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
    return [p.as_tuple() for p in info.value.problems]


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
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # trained through the end-of-turn token, not past it: the template's "\n" after it is cut
    assert tokenizer.decode(full[-1:]) == "\n" and full[-2] == im_end
    assert list(t.prompt) == prompt and list(t.prompt + t.chosen) == full[:-1]
    assert tokenizer.decode(t.chosen).startswith("A color.") and t.chosen[-1] == im_end
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


def varied_pairs() -> list[PreferencePair]:
    """Multi-turn, system prompts, unicode, repeated prompts and conversations, long answers."""
    def m(role: str, text: str) -> tuple[Message, ...]:
        return (Message(role, text),)

    system = m("system", "Be brief. Ünïcödé ok: 日本語, ñandú, emoji \U0001F600.")
    turns = m("user", "a") + m("assistant", "b") + m("user", "c, again")
    prompts = [m("user", "Hi"), system + m("user", "Straße?"), turns, system + turns,
               m("user", "word " * 70), m("user", "  spaces\n\ttabs  ")]
    answers = ["Yes.", "No.", "word " * 45, "Ça va. 日本語です", "Same start, good", "Same start, bad"]
    out = []
    for i in range(60):
        prompt = prompts[i % len(prompts)]
        chosen, rejected = answers[i % 6], answers[(i + 1 + i // 6) % 6]
        if chosen == rejected:
            rejected = "Other."
        out.append(PreferencePair(prompt, m("assistant", chosen), m("assistant", rejected),
                                  Source(f"f{i % 2}.jsonl", i + 1)))
    return out


def per_pair(tokenizer: Any, pairs: list[PreferencePair], max_seq_len: int) -> tuple[list, list, list]:
    """The one-pair-at-a-time result: kept pairs, dropped sources and problems."""
    kept, dropped, problems = [], [], []
    for p in pairs:
        try:
            t = tokenize_pair(tokenizer, p, max_seq_len)
        except RecordError as exc:
            problems.append((p.source.file, p.source.line, exc.field, exc.message))
            continue
        (kept if t is not None else dropped).append(t if t is not None else p.source)
    return kept, dropped, problems


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_batched_tokenization_equals_tokenizing_each_pair(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    import importlib

    import preftune.data.tokenize as data

    monkeypatch.setattr(importlib.import_module("preftune.data.render"), "CHUNK", chunk)
    monkeypatch.setattr(data, "PAIRS_PER_STEP", 5 * chunk)
    pairs = varied_pairs()
    out, report = tokenize_pairs(tokenizer, pairs, max_seq_len=120)
    kept, dropped, problems = per_pair(tokenizer, pairs, 120)
    assert not problems and out == kept and report.dropped == dropped
    assert report.truncated == [t.source for t in kept if t.truncated]
    assert len(dropped) == 10 and 0 < len(report.truncated) < len(kept)  # the data exercises both
    assert all(len(t.prompt) + max(len(t.chosen), len(t.rejected)) <= 120 for t in out)


def with_template(tokenizer: Any, template: str) -> Any:
    from preftune.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}")


def test_template_errors_name_every_line_and_field_as_per_pair_does(tokenizer: Any) -> None:
    """A template that raises (roles must alternate, say) is a problem of that line, not a crash."""
    raising = with_template(tokenizer, (
        "{%- for message in messages %}{%- if 'BAD' in message['content'] %}"
        "{{ raise_exception('no BAD please') }}{%- endif %}{%- endfor %}" + CHATML
        + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"))
    pairs = [pair("ok", "Yes.", "No."), pair("BAD", "Yes.", "No."), pair("ok", "Yes.", "BAD"),
             pair("ok", "BAD", "Yes.")]  # the same conversation as line 3's rejected one
    pairs = [PreferencePair(p.prompt, p.chosen, p.rejected, Source("d.jsonl", i + 1))
             for i, p in enumerate(pairs)]
    with pytest.raises(DataError) as info:
        tokenize_pairs(raising, pairs, max_seq_len=99)
    assert [p.as_tuple() for p in info.value.problems] == per_pair(raising, pairs, 99)[2]
    found = [(p.where.line, p.field) for p in info.value.problems]
    assert found == [(2, "prompt"), (3, "rejected"), (4, "chosen")]
    assert "the chat template failed: no BAD please" in str(info.value)


def test_a_prompt_that_is_not_a_token_prefix_is_reported_as_per_pair_does(tokenizer: Any) -> None:
    thinking = with_template(tokenizer, CHATML + (
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>' }}{%- endif %}"))
    pairs = varied_pairs()[:8]
    with pytest.raises(DataError) as info:
        tokenize_pairs(thinking, pairs, max_seq_len=99)
    assert [p.as_tuple() for p in info.value.problems] == per_pair(thinking, pairs, 99)[2]
    assert len(info.value.problems) == 8 and info.value.problems[0].field == "chosen"


@pytest.mark.parametrize("template", ["chatml", "llama3-like"])
def test_the_fast_paths_give_exactly_the_ids_of_apply_chat_template(template: str) -> None:
    """Rendered texts encoded by the Rust tokenizer, and the prompt encoded once (conversations cut
    at the prompt's last added token), give the ids of ``apply_chat_template(tokenize=True)``."""
    import random

    from preftune.data.render import template_renderer
    from preftune.data.tokenize import direct_encoder, prompt_splitter, tokenize_pairs
    from preftune.tiny import tiny_tokenizer

    def fresh() -> Any:
        tokenizer = tiny_tokenizer()
        if template != "chatml":
            tokenizer.chat_template = (
                "{% for m in messages %}<|im_start|>{{ m['role'] }}<|endoftext|>\n\n{{ m['content'] }}"
                "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant"
                "<|endoftext|>\n\n{% endif %}")
        return tokenizer

    rng = random.Random(3)
    words = ["a", " b", "\n", "  ", "\t", "héllo", "日本", "<b>", "[1]", "x.", " ", "\n\n"]

    def say() -> str:
        return "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))

    pairs = []
    for i in range(60):
        turns = [Message("system", say())] if i % 3 == 0 else []
        for _ in range(i % 3):
            turns += [Message("user", say()), Message("assistant", say())]
        prompt = (*turns, Message("user", say()))
        pairs.append(PreferencePair(prompt, (Message("assistant", say() + "!"),),
                                    (Message("assistant", say() + "?"),), Source("r.jsonl", i + 1)))
    fast = fresh()
    assert direct_encoder(fast) is not None and prompt_splitter(fast) is not None
    assert template_renderer(fast) is not None
    slow = fresh()
    slow._preftune_direct = slow._preftune_split = slow._preftune_render = None  # apply_chat_template only
    assert tokenize_pairs(fast, pairs, 4096) == tokenize_pairs(slow, pairs, 4096)


@pytest.mark.parametrize("flag", ["rstrip", "single_word", "normalized", "lstrip"])
def test_the_prompt_is_cut_only_after_tokens_matched_as_plain_strings(flag: str) -> None:
    """An added token that takes the whitespace after it, matches on normalized text, or (any
    token) only as a whole word never cuts a text; the ids stay those of apply_chat_template."""
    from tokenizers import AddedToken

    from preftune.data.render import prompt_splitter
    from preftune.tiny import tiny_tokenizer

    def fresh() -> Any:
        tokenizer = tiny_tokenizer()
        tokenizer.add_tokens([AddedToken("<turn>", **{"normalized": False, flag: True})])
        tokenizer.chat_template = (
            "{% for m in messages %}<turn>  {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<turn>  assistant: {% endif %}")
        return tokenizer

    fast, slow = fresh(), fresh()
    slow._preftune_direct = slow._preftune_split = slow._preftune_render = None
    split = prompt_splitter(fast)
    assert ("<turn>" in (split.cut_after if split is not None else ())) == (flag == "lstrip")
    pairs = [PreferencePair((Message("user", f" q{i}  x"),), (Message("assistant", f" yes {i}"),),
                            (Message("assistant", f"  no {i}\n"),), Source("r.jsonl", i + 1))
             for i in range(12)]
    assert tokenize_pairs(fast, pairs, 4096) == tokenize_pairs(slow, pairs, 4096)


def test_a_longer_added_token_that_starts_like_a_cut_token_is_never_cut_inside() -> None:
    """``<|im_start|>assistant`` added (taking the whitespace after it): the tokenizer matches it
    whole, longest first, so the text is cut after the ``<|im_end|>`` before it, never after its
    ``<|im_start|>`` part."""
    from tokenizers import AddedToken

    from preftune.data.render import PromptSplitter
    from preftune.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<|im_start|>assistant", rstrip=True, normalized=False)])
    split = PromptSplitter(tokenizer)
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n  Sure"
    head = split.head(text)
    assert head == "<|im_start|>user\nhi<|im_end|>"
    assert sum(split.encode_ids([head, text[len(head):]]), []) == split.encode_ids([text])[0]


def test_a_chat_template_or_added_token_set_after_tokenizing_is_probed_anew() -> None:
    """What the probes decided holds for the template and added tokens they saw: a tokenizer
    given another template (or another added token) afterwards renders with it."""
    from tokenizers import AddedToken

    from preftune.data.render import prompt_splitter, template_renderer
    from preftune.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    pair = PreferencePair((Message("user", "Hi there"),), (Message("assistant", "Hello."),),
                          (Message("assistant", "Go."),), Source("r.jsonl", 1))
    before = tokenize_pairs(tokenizer, [pair], 4096)[0][0]
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}" \
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    after = tokenize_pairs(tokenizer, [pair], 4096)[0][0]
    expected = tokenizer.apply_chat_template([pair.prompt[0].as_dict()], add_generation_prompt=True)
    assert after.prompt != before.prompt and list(after.prompt) == list(expected["input_ids"])
    assert template_renderer(tokenizer) is not None
    tokenizer.add_tokens([AddedToken("<|im_start|>x", rstrip=True, normalized=False)])
    assert "<|im_start|>x" not in prompt_splitter(tokenizer).cut_after
    assert "<|im_start|>x" in prompt_splitter(tokenizer).cuts.pattern.replace("\\", "")
