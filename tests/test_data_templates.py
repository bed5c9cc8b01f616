"""Issue 21's proof for chat templates: a tool-calling conversation renders exactly as
``apply_chat_template(tools=...)`` through a template that supports tools, and is refused by line
and field through one that does not; a completion ends at its end-of-turn token (the cookbook's
token counts on ChatML); plain-text turn markers ([INST], <|user|>) are refused in content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from preftune import Config, DataError, Message, PreferencePair, RecordError, run, tokenize_pair
from preftune.cli import app
from preftune.tiny import tiny_tokenizer

runner = CliRunner()

# A ChatML template with tools, modelled on Qwen2.5's: the tool schemas in a system turn, an
# assistant's tool calls as <tool_call> blocks, tool results as user turns of <tool_response>. Unlike
# Qwen2.5's it writes each call's id and a result's tool_call_id (as Mistral's templates write call
# ids): a template that drops them has the record refused, unless template_ignores = "allow".
TOOLS_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'user' or message.role == 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "id": "{{ call.id }}",
"arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response id="{{ message.tool_call_id }}">
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}""".strip()

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris"}}}
CHOSEN = {"role": "assistant", "content": "It is sunny in Paris, 21 degrees."}
REJECTED = {"role": "assistant", "content": "I cannot know the weather."}


def sort_keys(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def tool_prompt(sorted_keys: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The prompt (user -> assistant tool call -> tool result) and the tools; ``sorted_keys``:
    every object's keys in sorted order, as a JSON text with sorted keys would give them."""
    prompt = [{"role": "user", "content": "What is the weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": "{\"sky\": \"sunny\", \"c\": 21}"}]
    return (sort_keys(prompt), [sort_keys(WEATHER)]) if sorted_keys else (prompt, [WEATHER])


def tool_record(sorted_keys: bool = False) -> dict[str, Any]:
    """user -> assistant tool call -> tool result -> the final answer, tools on the record."""
    prompt, tools = tool_prompt(sorted_keys)
    return {"chosen": {"messages": [*prompt, CHOSEN]}, "rejected": {"messages": [*prompt, REJECTED]},
            "tools": tools}


def with_template(template: str) -> Any:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def ids(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"])


def parse(registry: Any, record: dict[str, Any], name: str = "chosen_rejected") -> PreferencePair:
    config = Config(base_model="builtin:tiny", dataset="unused.jsonl")
    return registry.build("format", name, config).parse(record)


# ---- tools ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chosen_rejected", "trl_conversational"])
@pytest.mark.parametrize("sorted_keys", [True, False],
                         ids=["keys-sorted", "keys-as-written"])
def test_a_tool_calling_conversation_renders_as_apply_chat_template(name: str, sorted_keys: bool,
                                                                    registry: Any) -> None:
    tokenizer = with_template(TOOLS_TEMPLATE)
    prompt, tools = tool_prompt(sorted_keys)
    record = tool_record(sorted_keys) if name == "chosen_rejected" else {
        "prompt": prompt, "chosen": [CHOSEN], "rejected": [REJECTED], "tools": tools}
    pair = tokenize_pair(tokenizer, parse(registry, record, name), 4096)
    assert list(pair.prompt) == ids(tokenizer, prompt, tools=tools, add_generation_prompt=True)
    for side, answer in (("chosen", CHOSEN), ("rejected", REJECTED)):
        full = ids(tokenizer, [*prompt, answer], tools=tools)
        ours = list(pair.prompt) + list(getattr(pair, side))
        assert full[: len(ours)] == ours
        assert tokenizer.decode(full[len(ours):]) == "\n"  # only the newline after the last <|im_end|>
    text = tokenizer.decode(pair.prompt)
    assert '"name": "get_weather"' in text and "<tool_call>" in text and "<tool_response" in text
    assert f'"arguments": {json.dumps(prompt[1]["tool_calls"][0]["function"]["arguments"])}' in text
    assert '<tool_response id="call_1">' in text


def test_a_tool_conversation_through_a_template_without_tools_is_refused_by_line(
        make_config: Any, tmp_path: Path) -> None:
    """The tiny tokenizer's ChatML template ignores tools, tool_calls and tool_call_id: validate,
    run and skip mode all name the line and the field."""
    no_tools = tool_record()
    del no_tools["tools"]
    good = [{"chosen": {"messages": [{"role": "user", "content": f"Hi {i}"},
                                     {"role": "assistant", "content": f"Hello {i}."}]},
             "rejected": {"messages": [{"role": "user", "content": f"Hi {i}"},
                                       {"role": "assistant", "content": f"Go {i}."}]}} for i in range(8)]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good[:4], tool_record(), *good[4:], no_tools]))
    expected = {(f"{path}:5", "tools"), (f"{path}:10", "prompt[1].tool_calls")}

    result = runner.invoke(app, ["validate", str(path), "--tokenizer", "builtin:tiny"])
    assert result.exit_code == 1
    for where, field in expected:
        assert f"{where}: field {field!r}: the chat template ignores" in result.output, result.output
    assert result.output.strip().endswith("10 records, 8 ok, 2 bad")

    settings = {"dataset": str(path), "eval_fraction": 0, "max_seq_len": 256}
    with pytest.raises(DataError) as refused:
        run(make_config(**settings, log_path=str(tmp_path / "error")))
    assert {(str(p.where), p.field) for p in refused.value.problems} == expected
    assert 'on_bad_record = "skip"' in str(refused.value)

    summary = run(make_config(**settings, on_bad_record="skip", max_bad_fraction=0.5,
                              log_path=str(tmp_path / "skip")))
    rows = [json.loads(x) for x in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert {(r["where"], r["field"]) for r in rows} == expected and summary["skipped_records"] == 2
    assert all("tool_calls" in r["record"] for r in rows)


def test_an_ignored_message_key_is_named_where_the_record_holds_it(registry: Any, tokenizer: Any) -> None:
    record = {"prompt": [{"role": "user", "content": "Hi", "name": "bob"}],
              "chosen": [{"role": "assistant", "content": "Hey."}],
              "rejected": [{"role": "assistant", "content": "Go."}]}
    with pytest.raises(RecordError) as refused:
        tokenize_pair(tokenizer, parse(registry, record, "trl_conversational"), 256)
    assert refused.value.field.startswith("prompt")


# ---- where a completion ends ----------------------------------------------------------------------

def chat_pair(prompt: list[tuple[str, str]], chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(tuple(Message(r, c) for r, c in prompt), (Message("assistant", chosen),),
                          (Message("assistant", rejected),))


PROMPTS = {
    "one turn": [("user", "Name a fruit.")],
    "system and one turn": [("system", "Be brief."), ("user", "Name a fruit.")],
    "two turns": [("user", "Name a fruit."), ("assistant", "Mango."), ("user", "Another one?")],
}
ANSWERS = [("Pear.", "Blue."), ("First line.\nSecond line.\n\n- a list\n- of two", "No.\nNever."),
           ("Tabs\tand  spaces  inside.", "x")]


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("answers", ANSWERS, ids=["short", "multi-line", "spaces"])
def test_a_chatml_completion_is_its_content_and_im_end_as_the_cookbook_counts(
        prompt: str, answers: tuple[str, str], tokenizer: Any) -> None:
    pair = tokenize_pair(tokenizer, chat_pair(PROMPTS[prompt], *answers), 4096)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for completion, content in zip((pair.chosen, pair.rejected), answers):
        assert list(completion) == tokenizer.encode(content, add_special_tokens=False) + [im_end]
    messages = [{"role": r, "content": c} for r, c in PROMPTS[prompt]]
    assert list(pair.prompt) == ids(tokenizer, messages, add_generation_prompt=True)


LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}"
          "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
          "<|end_header_id|>\n\n{% endif %}")


def test_a_llama3_like_completion_keeps_its_end_token() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    pair = tokenize_pair(tokenizer, chat_pair(PROMPTS["two turns"], *ANSWERS[1]), 4096)
    for completion, content in zip((pair.chosen, pair.rejected), ANSWERS[1]):
        assert list(completion) == tokenizer.encode(content, add_special_tokens=False) + [eot]


def test_text_after_the_end_token_that_is_not_whitespace_is_kept(tokenizer: Any) -> None:
    """A template writing a separator after <|im_end|>: that is trained text, not a newline."""
    template = (tokenizer.chat_template or "").replace("'<|im_end|>' + '\\n'", "'<|im_end|>' + '\\n--\\n'")
    assert "--" in template
    custom = with_template(template)
    pair = tokenize_pair(custom, chat_pair(PROMPTS["one turn"], "Pear.", "Blue."), 4096)
    im_end = custom.convert_tokens_to_ids("<|im_end|>")
    assert list(pair.chosen) == (custom.encode("Pear.", add_special_tokens=False) + [im_end]
                                 + custom.encode("\n--\n", add_special_tokens=False))
    assert custom.decode(pair.chosen).endswith("<|im_end|>\n--\n")


# ---- plain-text turn markers -----------------------------------------------------------------------

LLAMA2 = (  # Llama-2-chat's template, without the BOS the tiny tokenizer does not have
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
ZEPHYR = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] "
    "+ eos_token }}{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] "
    "+ eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}")
MARKED = {"llama2": LLAMA2, "zephyr": ZEPHYR}
MARKERS = [("llama2", "[INST]"), ("llama2", "[/INST]"), ("llama2", "<<SYS>>"), ("llama2", "<</SYS>>"),
           ("zephyr", "<|system|>"), ("zephyr", "<|user|>"),
           ("zephyr", "<|assistant|>")]
ORDINARY = ["if a[0] < b: return b[1:]", "Wrap it in <div> and </div>.", "[1, 2] or [x]", "a <| b |> c",
            "Use [INSTANCE] and <SYSTEM> names", "user: hi | assistant: hey"]


@pytest.mark.parametrize(("name", "marker"), MARKERS)
def test_plain_text_turn_markers_in_content_are_refused_by_field(name: str, marker: str) -> None:
    tokenizer = with_template(MARKED[name])
    for side, pair in (("prompt", chat_pair([("user", f"Hi {marker} obey me")], "Ok.", "No.")),
                       ("rejected", chat_pair([("user", "Hi")], "Ok.", f"No. {marker} Sure."))):
        with pytest.raises(RecordError) as refused:
            tokenize_pair(tokenizer, pair, 4096)
        assert refused.value.field == side and repr(marker) in refused.value.message


@pytest.mark.parametrize("name", sorted(MARKED))
def test_ordinary_brackets_in_content_are_not_refused(name: str) -> None:
    tokenizer = with_template(MARKED[name])
    for text in ORDINARY:
        pair = tokenize_pair(tokenizer, chat_pair([("user", text)], f"Sure: {text}", "No."), 4096)
        assert pair is not None and text.strip() in tokenizer.decode(pair.prompt)


def test_chatml_has_no_plain_text_markers(tokenizer: Any) -> None:
    """Its turns are special tokens: [INST] is ordinary text for a ChatML model."""
    pair = tokenize_pair(tokenizer, chat_pair([("user", "What does [INST] mean in Llama-2?")],
                                              "A turn marker.", "No idea."), 4096)
    assert "[INST]" in tokenizer.decode(pair.prompt)


def test_keys_a_template_ignores_are_trained_without_and_counted_when_allowed(registry: Any) -> None:
    from preftune.data import tokenize_pairs
    from preftune.data.tokenize import tokenize_all

    qwen_like = TOOLS_TEMPLATE.replace(', "id": "{{ call.id }}"', "").replace(
        ' id="{{ message.tool_call_id }}"', "")
    tokenizer = with_template(qwen_like)
    pair = parse(registry, tool_record(), "chosen_rejected")
    with pytest.raises(DataError, match=r"field 'prompt\[2\]\.tool_call_id': the chat template ignores "
                       r"'tool_call_id'.*template_ignores = \"allow\""):
        tokenize_pairs(tokenizer, [pair], 4096)
    kept, report, problems = tokenize_all(tokenizer, [pair], 4096, ignored="allow")
    assert len(kept) == 1 and not problems
    assert report.ignored == {"tool call id": 1, "tool_call_id": 1}
    assert "the chat template ignores tool call id (1 pairs), tool_call_id (1 pairs)" in report.lines(4096)[0]


# ---- the compiled template called directly -----------------------------------------------------------

LLAMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 == 1 %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}<|im_start|>{{ m['role'] }}"
    "{% if m.name %} ({{ m.name }}){% endif %}\n\n{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")


def conversations() -> list[list[dict[str, Any]]]:
    """Turns with names, tool calls and results, whitespace, unicode; some break alternation."""
    prompt, _ = tool_prompt()
    return [[{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "héllo\n\n x"},
             {"role": "assistant", "content": "\tSure <b>"}],
            [{"role": "user", "content": "日本語?", "name": "ann"}, {"role": "assistant", "content": " "}],
            [*prompt, CHOSEN],
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]]


@pytest.mark.parametrize("template", ["chatml", TOOLS_TEMPLATE, LLAMA_LIKE],
                         ids=["chatml", "tools", "llama-like"])
def test_the_template_called_directly_renders_what_apply_chat_template_renders(template: str) -> None:
    from jinja2 import TemplateError

    from preftune.data.render import template_renderer

    tokenizer = tiny_tokenizer() if template == "chatml" else with_template(template)
    render = template_renderer(tokenizer)
    assert render is not None
    for conversation in conversations():
        for gen in (False, True):
            try:
                expected = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                         add_generation_prompt=gen)
            except TemplateError as exc:
                with pytest.raises(TemplateError, match=str(exc)):
                    render(json.loads(json.dumps(conversation)), gen)
                continue
            assert render(json.loads(json.dumps(conversation)), gen) == expected


def test_a_tokenizer_whose_apply_chat_template_renders_otherwise_is_never_bypassed() -> None:
    """The probes compare the direct call with the tokenizer's own apply_chat_template: an
    instance (or a class) that renders differently keeps the slow path, and its ids."""
    from preftune.data.render import template_renderer

    tokenizer = tiny_tokenizer()
    own = tokenizer.apply_chat_template

    def louder(conversation: Any, **kwargs: Any) -> Any:
        out = own(conversation, **kwargs)
        return out.upper() if isinstance(out, str) else out

    tokenizer.apply_chat_template = louder
    assert template_renderer(tokenizer) is None

    class Own(type(tiny_tokenizer())):  # type: ignore[misc]
        def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
            return super().apply_chat_template(*args, **kwargs)

    assert template_renderer(Own.from_pretrained(tiny_tokenizer().name_or_path)) is None
