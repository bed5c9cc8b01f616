"""What a chat template must render: the keys a record holds, and no turn markers in content.

A key the template renders as if absent (tools, a message's name, tool calls) is refused naming
where the record holds it, or counted with ``template_ignores = "allow"``. Text holding the
tokenizer's control tokens or the template's plain-text turn markers is refused: rendered, it
would start or end a turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from ..errors import RecordError
from ..types import Message, PreferencePair
from .render import try_render

SIDES = ("chosen", "rejected")


SENTINELS = ("PREFTUNE0SYSTEM", "PREFTUNE1USER", "PREFTUNE2ASSISTANT")


def template_markers(tokenizer: Any) -> set[str]:
    """Plain-text turn markers a chat template writes (Llama-2's ``[INST]``, ``<<SYS>>``, Zephyr's
    ``<|user|>``): the words of its frame, around sentinel contents, that hold brackets. A template
    made of special tokens has none; role names and whitespace are never markers."""
    from jinja2 import TemplateError

    roles = ("system", "user", "assistant")
    for messages in ([{"role": r, "content": c} for r, c in zip(roles, SENTINELS)],
                     [{"role": r, "content": c} for r, c in zip(roles[1:], SENTINELS[1:])]):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except (TemplateError, ValueError, TypeError):
            continue
        specials = sorted(special_texts(tokenizer), key=len, reverse=True)
        frame = re.split("|".join(map(re.escape, [*SENTINELS, *specials])), str(text))
        words = {w for piece in frame for w in piece.split()}
        return {w for w in words if len(w) >= 3 and re.search(r"[\[\]<>|]", w)}
    return set()


def special_texts(tokenizer: Any) -> set[str]:
    """The text of the tokenizer's special tokens (``<|im_end|>``, ``</s>``...)."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return {t for t in specials if t}


def control_tokens(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern matching the tokenizer's special tokens (``<|im_end|>``, ``</s>``...) and its
    template's plain-text turn markers (``[INST]``) in text."""
    specials = special_texts(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        markers = template_markers(tokenizer)
        specials |= {m for m in markers if not any(s and s in m for s in specials)}
    specials = {t for t in specials if t}
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None


def texts_of(pair: PreferencePair, eos: str = "") -> Iterator[tuple[str, int, str]]:
    """``(side, message index, text)`` of every text a pair holds; a text completion's own final
    EOS (kept, not doubled, as TRL does) is no text of its."""
    for side in ("prompt", *SIDES):
        value = getattr(pair, side)
        if isinstance(value, str):
            yield side, 0, value[: -len(eos)] if side != "prompt" and eos and value.endswith(eos) else value
            continue
        for i, message in enumerate(value):
            yield side, i, message.content


def check_control_tokens(pair: PreferencePair, pattern: re.Pattern[str] | None, eos: str = "") -> None:
    """Refuse message text holding the chat template's own control tokens or turn markers:
    rendered, they would become real turn boundaries, a turn injected into the training data."""
    if pattern is None:
        return
    for side, i, text in texts_of(pair, eos):
        found = pattern.search(text)
        if found:
            what = "text" if pair.is_text else f"message {i}"
            raise RecordError(side, f"{what} contains the tokenizer's control token "
                              f"{found.group()!r}; as text it would end or start a turn")


MESSAGE_KEYS = ("name", "tool_calls", "tool_call_id")


def check_template_reads(tokenizer: Any, pair: PreferencePair, ignored: str = "error") -> list[str]:
    """Refuse what the chat template would drop: a record's ``tools``, a message's ``name``,
    ``tool_calls`` (or the ``id`` of a call) or ``tool_call_id``, a ``tool`` turn. Each is
    rendered with and without it; the same tokens mean the template ignores it, and the model
    would train on less than the record says. With ``ignored = "allow"`` (the setting
    ``template_ignores``) the pair is kept and the keys it loses are returned, to be reported."""
    if pair.is_text or not needs_template_check(pair):
        return []
    lost = []
    for side in SIDES:
        for where, what, label in ignored_keys(tokenizer, pair, side):
            if ignored != "allow":
                raise RecordError(where, f"the chat template ignores {what}: rendered with and without "
                                  "it, the tokens are the same (set template_ignores = \"allow\" to "
                                  "train without it)")
            lost.append(label)
    return sorted(set(lost))


def ignored_keys(tokenizer: Any, pair: PreferencePair, side: str) -> Iterator[tuple[str, str, str]]:
    """``(field, what, key)`` of each key of ``prompt + side`` that the template renders as if absent;
    ``field`` is where the pair holds it (``prompt[0].name``)."""
    conversation = pair.prompt + getattr(pair, side)
    full = try_render(tokenizer, conversation, False, side, pair.tools)
    if isinstance(full, RecordError):
        return  # the render's own error is the pair's problem, said by assemble
    if pair.tools is not None and full == try_render(tokenizer, conversation, False, side):
        yield "tools", "the record's tools (it does not support tool definitions)", "tools"
    for key in MESSAGE_KEYS:
        if any(getattr(m, key) is not None for m in conversation):
            bare = tuple(replace(m, **{key: None}) for m in conversation)
            if full == try_render(tokenizer, bare, False, side, pair.tools):
                yield (where_held(pair, side, lambda m, k=key: getattr(m, k) is not None, key), repr(key),
                       key)
    if any(call_ids(m) for m in conversation):
        bare = tuple(replace(m, tool_calls=without_ids(m.tool_calls)) if call_ids(m) else m
                     for m in conversation)
        if full == try_render(tokenizer, bare, False, side, pair.tools):
            yield where_held(pair, side, call_ids, "tool_calls"), "the 'id' of each tool call", "tool call id"
    if any(m.role == "tool" for m in conversation):
        bare = tuple(m for m in conversation if m.role != "tool")
        if full == try_render(tokenizer, bare, False, side, pair.tools):
            yield (where_held(pair, side, lambda m: m.role == "tool", ""), "'tool' turns (tool results)",
                   "tool turns")


def where_held(pair: PreferencePair, side: str, holds: Any, key: str) -> str:
    """The field of the first message of ``prompt`` or ``side`` that ``holds`` says has ``key``."""
    for name in ("prompt", side):
        for i, message in enumerate(getattr(pair, name)):
            if holds(message):
                return f"{name}[{i}]" + (f".{key}" if key else "")
    return side


def call_ids(message: Message) -> bool:
    calls = json.loads(message.tool_calls) if message.tool_calls else []
    return any(isinstance(c, dict) and "id" in c for c in calls)


def without_ids(tool_calls: str | None) -> str | None:
    calls = json.loads(tool_calls) if tool_calls else []
    return json.dumps([{k: v for k, v in c.items() if k != "id"} if isinstance(c, dict) else c
                       for c in calls], ensure_ascii=False, separators=(",", ":"))


def needs_template_check(pair: PreferencePair) -> bool:
    messages = pair.prompt + pair.chosen + pair.rejected
    return pair.tools is not None or any(
        m.role == "tool" or any(getattr(m, k) is not None for k in MESSAGE_KEYS) for m in messages)
