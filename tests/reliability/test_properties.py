"""Property tests (issue 15): any bytes as a JSONL line, and any JSON value as a record, either
parse to valid pairs, read exactly as the record says, or raise preftune's DataError located at
the file and line; never another exception. Derandomized and bounded so CI never flakes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune import Config, DataError, RecordError
from preftune.data import check_pair, load_pairs, make_format, tokenize_pairs

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

GOOD = (b'{"input": "Hi?", "preferred_output": "Hello.", "non_preferred_output": "Go away."}')
FRAGMENTS = [b"\xef\xbb\xbf", b"\xff\xfe", b"\x1f\x8b", b"\r", b"\r\n", b"\x0c", b"\x00", b"\\ud800",
             b"\\udc00", b"NaN", b"Infinity", b"[" * 50, b"\xc3", b"\xe2\x80\xa8", b'"', b"{", b"}"]
TEXT = st.text(max_size=12) | st.sampled_from(["", " ", "\ud800", "a\udfffb", "\u2028", "<|im_end|>"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=12)
ROLE = st.sampled_from(["user", "assistant", "system", "tool", ""]) | TEXT
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2) | JSON})
CONVERSATION = st.lists(MESSAGE, max_size=3)
OUTPUT = TEXT | CONVERSATION | st.fixed_dictionaries({"messages": CONVERSATION})
WORDS = st.text(min_size=1, max_size=12).filter(str.strip)  # plausible records: mostly valid pairs


def format1(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    user = {"role": "user", "content": prompt}
    return {side: {"messages": [user, {"role": "assistant", "content": text}]}
            for side, text in (("chosen", chosen), ("rejected", rejected))}


PLAUSIBLE = st.builds(format1, WORDS, WORDS, WORDS) | st.fixed_dictionaries(
    {"input": WORDS, "preferred_output": WORDS, "non_preferred_output": WORDS})
RECORDS = (PLAUSIBLE | JSON | st.fixed_dictionaries({"chosen": OUTPUT, "rejected": OUTPUT})
           | st.fixed_dictionaries({"input": OUTPUT, "preferred_output": OUTPUT,
                                    "non_preferred_output": OUTPUT}))


def mutated(line: bytes) -> Any:
    """``line`` with a few bytes replaced by arbitrary or troublesome ones."""
    insert = st.binary(min_size=1, max_size=4) | st.sampled_from(FRAGMENTS)
    return st.tuples(st.integers(0, len(line)), st.integers(0, 3), insert).map(
        lambda cut: line[: cut[0]] + cut[2] + line[cut[0] + cut[1]:])


LINES = (st.binary(max_size=120) | st.lists(st.sampled_from(FRAGMENTS), max_size=4).map(b"".join)
         | mutated(GOOD))


@pytest.fixture
def fmt(registry: Any) -> Any:
    return make_format(registry, Config(base_model="builtin:tiny", dataset="x"))


def outcome(path: Path, fmt: Any) -> list[Any] | DataError:
    """The pairs, or the DataError; any other exception fails the test."""
    try:
        return load_pairs(path, fmt)
    except DataError as exc:
        return exc


@BOUNDED
@given(line=LINES)
def test_any_bytes_as_a_line_parse_or_fail_at_that_line(tmp_path: Path, fmt: Any, tokenizer: Any,
                                                         line: bytes) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b"\n" + line + b"\n" + GOOD + b"\n")
    span = range(2, 3 + line.count(b"\n"))  # the lines these bytes occupy
    result = outcome(path, fmt)
    if isinstance(result, DataError):
        rows = [p.as_tuple() for p in result.problems]
        assert rows and all(f == str(path) and n in span for f, n, _, _ in rows)
        return
    assert result[0].source.line == 1 and result[-1].source.line == span[-1] + 1  # both good lines
    for pair in result:
        check_pair(pair)  # every pair read is a valid pair
    try:  # and tokenizes, or is refused by line
        tokenize_pairs(tokenizer, result, 64)
    except DataError as exc:
        assert all(n in span for _, n, _, _ in (p.as_tuple() for p in exc.problems))


@BOUNDED
@given(record=RECORDS, ascii_only=st.booleans())
def test_any_json_value_as_a_record_reads_as_it_parses_in_memory_or_fails_at_its_line(
    tmp_path: Path, fmt: Any, tokenizer: Any, record: Any, ascii_only: bool
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(record, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))
    result = outcome(path, fmt)
    try:
        chosen_format = fmt.select(record) if isinstance(record, dict) else None
        expected = chosen_format.parse(record) if chosen_format else None
        if expected is not None:
            check_pair(expected, getattr(chosen_format, "field_names", None))
    except RecordError:
        expected = None  # what the format refuses in memory, the file must refuse too
    if isinstance(result, DataError):
        assert [(f, n) for f, n, _, _ in (p.as_tuple() for p in result.problems)] == [(str(path), 1)]
        return
    [pair] = result
    assert expected is not None
    assert (pair.prompt, pair.chosen, pair.rejected) == (expected.prompt, expected.chosen, expected.rejected)
    try:  # any text that parses tokenizes, or is refused at its line
        tokenize_pairs(tokenizer, result, 64)
    except DataError as exc:
        assert [(f, n) for f, n, _, _ in (p.as_tuple() for p in exc.problems)] == [(str(path), 1)]


# ---- the fast paths against apply_chat_template ------------------------------------------------------

PIECES = st.sampled_from(["a", " b", "\n", "  ", "\t", "héllo", "日本", "<b>", "[1]", "x.", " ", "\n\n",
                          "assistant", "user:", "\r\n", "🙂", "{{", "%}", "'", '"'])
SAY = st.lists(PIECES, min_size=1, max_size=10).map("".join)
TURN = st.tuples(st.sampled_from(["user", "user", "system", "tool"]), SAY, st.none() | st.just("ann"))
TEMPLATES = {
    "chatml": None,  # the tiny tokenizer's own
    "llama-like": ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}"
                   "{% if m.name %} {{ m.name }}{% endif %}<|endoftext|>\n\n{{ m['content'] | trim }}"
                   "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant"
                   "<|endoftext|>\n\n{% endif %}"),
    "strict": ("{% set ns = namespace(i=0) %}{% for m in messages %}{% if m['role'] != 'system' %}"
               "{% if (m['role'] == 'user') != (ns.i % 2 == 0) %}"
               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
               "{% set ns.i = ns.i + 1 %}{% endif %}"
               "{% if loop.first %}[{{ strftime_now('%Y') | length }}]{% endif %}<|im_start|>"
               "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


@BOUNDED
@given(template=st.sampled_from(sorted(TEMPLATES)),
       prompts=st.lists(st.lists(TURN, min_size=1, max_size=3), min_size=1, max_size=4),
       answers=st.lists(st.tuples(SAY, SAY), min_size=4, max_size=4))
def test_any_conversation_tokenizes_as_apply_chat_template_does(
        template: str, prompts: list[Any], answers: list[Any]) -> None:
    """Whatever the turns, the direct template call, the prompt cut by text and the Rust encoder
    give exactly the ids (or the refusals) of ``apply_chat_template(tokenize=True)`` alone."""
    from preftune import Message, PreferencePair, Source
    from preftune.data.render import prompt_splitter, template_renderer
    from preftune.tiny import tiny_tokenizer

    def fresh() -> Any:
        tokenizer = tiny_tokenizer()
        if TEMPLATES[template] is not None:
            tokenizer.chat_template = TEMPLATES[template]
        return tokenizer

    pairs = [PreferencePair(tuple(Message(role, text, name) for role, text, name in turns),
                            (Message("assistant", good + "!"),), (Message("assistant", bad + "?"),),
                            Source("p.jsonl", i + 1))
             for i, (turns, (good, bad)) in enumerate(zip(prompts, answers))]
    fast, slow = fresh(), fresh()
    slow._preftune_direct = slow._preftune_split = slow._preftune_render = None
    assert template_renderer(fast) is not None and prompt_splitter(fast) is not None

    def result(tokenizer: Any) -> Any:
        try:
            return tokenize_pairs(tokenizer, pairs, 4096)
        except DataError as exc:
            return [p.as_tuple() for p in exc.problems]

    assert result(fast) == result(slow)
