"""Conversations to token ids with the tokenizer's chat template, in batches.

A Hugging Face tokenizer renders and encodes a batch exactly as one-by-one calls do. Where probe
conversations show it gives the same ids, rendered texts are encoded by the Rust tokenizer itself
(:func:`direct_encoder`), and a pair's prompt is encoded once (:func:`prompt_splitter`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import RecordError
from ..types import Message

T = TypeVar("T")

CHUNK = 512  # conversations per batched template call: bounds the memory of the encodings


Rendered = list[int] | RecordError  # token ids, or why the template could not render them


Slot = tuple[str, object, bool, "str | None"]  # ("chat", messages, generation prompt, tools) or ("text", ...)


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [m.as_dict() for m in messages]


def _ids(out: Any) -> Any:
    return out["input_ids"] if hasattr(out, "keys") else out


def _tools(tools: str | None) -> dict[str, Any]:
    """The ``tools`` argument of ``apply_chat_template``, only when a record has tools (a
    template that takes none is then not handed an argument it never saw before)."""
    return {"tools": json.loads(tools)} if tools is not None else {}


def render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool,
           tools: str | None = None) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(
        _as_dicts(messages), tokenize=True, add_generation_prompt=generation_prompt, **_tools(tools)
    )
    return list(_ids(out))


def try_render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool,
               field: str, tools: str | None = None) -> Rendered:
    """:func:`render`, with an error the template raises (e.g. roles that must alternate)
    returned as a :class:`RecordError` naming ``field``."""
    from jinja2 import TemplateError

    try:
        return render(tokenizer, messages, generation_prompt, tools)
    except TemplateError as exc:
        return RecordError(field, f"the chat template failed: {exc}")


def render_many(tokenizer: Any, conversations: Sequence[Sequence[Message]],
                generation_prompt: bool, tools: str | None = None) -> list[Rendered]:
    """:func:`try_render` of each conversation, batched for a Hugging Face tokenizer (its batch
    path renders and encodes exactly as one-by-one calls do, and encodes on all cores). Where
    :func:`direct_encoder` vouches for it, the rendered texts are encoded by the Rust tokenizer
    itself, without transformers' per-sequence wrapping (the same ids, a third less time)."""
    from jinja2 import TemplateError
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return [try_render(tokenizer, c, generation_prompt, "", tools) for c in conversations]
    encode = direct_encoder(tokenizer)
    out: list[Rendered] = []
    for start in range(0, len(conversations), CHUNK):
        chunk = conversations[start : start + CHUNK]
        try:
            batch = tokenizer.apply_chat_template([_as_dicts(c) for c in chunk], tokenize=encode is None,
                                                  add_generation_prompt=generation_prompt,
                                                  **_tools(tools))
        except TemplateError:  # find which ones fail, one by one
            out.extend(try_render(tokenizer, c, generation_prompt, "", tools) for c in chunk)
        else:
            out.extend(encode(batch) if encode is not None else [list(ids) for ids in _ids(batch)])
    return out


PROBES = ([{"role": "system", "content": " Be  brief.\n"}, {"role": "user", "content": "héllo  wörld\n\n x"},
           {"role": "assistant", "content": "\tSure <b>, [1]  ok.\n"}],
          [{"role": "user", "content": "日本語 ñandú Straße?"}, {"role": "assistant", "content": "  "}])


PROBED: list[str] = []  # the tokenizer attributes that keep what probes decided (see probed)


def probed(name: str) -> Callable[[Callable[[Any], T]], Callable[[Any], T]]:
    """A decision about a tokenizer made once per tokenizer, chat template and added tokens:
    kept on the tokenizer as ``name``, and forgotten when either changes (the probes saw those).
    A tokenizer that takes no attributes is decided about each time."""
    PROBED.append(name)

    def wrap(decide: Callable[[Any], T]) -> Callable[[Any], T]:
        @functools.wraps(decide)
        def decided(tokenizer: Any) -> T:
            forget_if_changed(tokenizer)
            if hasattr(tokenizer, name):
                return getattr(tokenizer, name)
            value = decide(tokenizer)
            try:
                setattr(tokenizer, name, value)
            except AttributeError:
                pass
            return value
        return decided
    return wrap


def forget_if_changed(tokenizer: Any) -> None:
    """Forget what the probes decided for ``tokenizer`` when its chat template or its added
    tokens changed since: they were decided for those."""
    now = (getattr(tokenizer, "chat_template", None),
           len(getattr(tokenizer, "added_tokens_decoder", None) or {}))
    seen = getattr(tokenizer, "_preftune_probed", None)
    if seen is not None and seen != now:
        for name in PROBED:
            if hasattr(tokenizer, name):
                delattr(tokenizer, name)
    try:
        tokenizer._preftune_probed = now
    except AttributeError:
        pass


@probed("_preftune_direct")
def direct_encoder(tokenizer: Any) -> Any:
    """A function from rendered chat texts to their ids by the Rust tokenizer's ``encode_batch``,
    or None where that would not give exactly what ``apply_chat_template(tokenize=True)`` gives:
    no backend, truncation or padding set on it, special tokens split, or any probe conversation
    encoded differently. Decided once per tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = None
    if backend is not None and backend.truncation is None and backend.padding is None \
            and not getattr(tokenizer, "split_special_tokens", False) \
            and not getattr(backend, "encode_special_tokens", False):
        def encode(texts: Sequence[str]) -> list[list[int]]:
            return [e.ids for e in ids_only(backend)(list(texts), add_special_tokens=False)]
        try:
            for probe in PROBES:
                for gen in (False, True):
                    text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=gen)
                    slow = list(_ids(tokenizer.apply_chat_template(probe, tokenize=True,
                                                                   add_generation_prompt=gen)))
                    if encode([text])[0] != slow:
                        encode = None
                        break
                if encode is None:
                    break
        except Exception:  # a template that refuses a probe (roles, system turns): stay on the slow path
            encode = None
    return encode


def ids_only(backend: Any) -> Any:
    """The Rust tokenizer's batch encoder that skips character offsets (``encode_batch_fast``,
    tokenizers 0.21 and later), for texts whose ids alone are needed; else ``encode_batch``."""
    return getattr(backend, "encode_batch_fast", backend.encode_batch)


def encode_many(tokenizer: Any, texts: Sequence[str]) -> list[Rendered]:
    """Token ids of plain texts (text pairs: no chat template), special tokens added as the
    tokenizer adds them (a BOS), as TRL tokenizes its "standard" records."""
    out: list[Rendered] = []
    for start in range(0, len(texts), CHUNK):
        out.extend(list(ids) for ids in _ids(tokenizer(list(texts[start : start + CHUNK]))))
    return out


@probed("_preftune_render")
def template_renderer(tokenizer: Any) -> Any:
    """A function ``(message dicts, generation flag) -> text`` that calls the tokenizer's compiled
    chat template directly, for conversations without tools, or None where that would not give
    exactly what ``apply_chat_template(tokenize=False)`` gives. Decided once per tokenizer.

    It hands the template what ``apply_chat_template`` hands it (the messages, no tools or
    documents, the generation flag, the special tokens) and skips only its per-conversation
    copying of messages into plain data, which preftune's messages (strings, and JSON-parsed tool
    calls, no None values, no reasoning keys) already are. transformers' own compiled template is
    used (its sandbox and globals), a tokenizer class with its own ``apply_chat_template`` is never
    bypassed, and every probe conversation must render to the same text or the same error."""
    render = None
    try:
        from transformers import PreTrainedTokenizerBase
        from transformers.utils.chat_template_utils import _compile_jinja_template

        if type(tokenizer).apply_chat_template is PreTrainedTokenizerBase.apply_chat_template:
            template = _compile_jinja_template(tokenizer.get_chat_template())
            extra = dict(tokenizer.special_tokens_map)
            if all(isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
                   for v in extra.values()):
                def render(messages: list[dict[str, Any]], gen: bool) -> str:
                    return template.render(messages=messages, tools=None, documents=None,
                                           add_generation_prompt=gen, **extra)
                if not all(_same_text(tokenizer, render, probe, gen)
                           for probe in PROBES + TOOL_PROBES for gen in (False, True)):
                    render = None
    except Exception:  # no such internals in this transformers, or no template: the slow path
        render = None
    return render


def _same_text(tokenizer: Any, render: Any, probe: list[dict[str, Any]], gen: bool) -> bool:
    """Whether the direct render of ``probe`` is apply_chat_template's text, or the same error."""
    def outcome(call: Any) -> tuple[str, str]:
        try:
            return "text", call()
        except Exception as exc:  # a template that refuses the probe must refuse it both ways
            return type(exc).__name__, str(exc)

    slow = outcome(lambda: tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=gen))
    fast = outcome(lambda: render(json.loads(json.dumps(probe)), gen))
    return slow == fast


TOOL_PROBES = ([{"role": "user", "content": "weather?", "name": "ann"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "id": "c1",
                                 "function": {"name": "get", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "{\"t\": 3}", "tool_call_id": "c1"},
                {"role": "assistant", "content": "3 degrees."}],)


def render_texts(tokenizer: Any, keys: Sequence[Slot]) -> list[str | RecordError]:
    """Each chat slot's rendered text (not encoded), batched by generation flag and tools
    (conversations without tools by :func:`template_renderer` where it vouches for itself)."""
    from jinja2 import TemplateError

    groups: dict[tuple[bool, str | None], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault((key[2], key[3]), []).append(i)
    out: list[str | RecordError] = [""] * len(keys)
    direct = template_renderer(tokenizer)
    for (gen, tools), todo in groups.items():
        if direct is not None and tools is None:
            for i in todo:
                try:
                    out[i] = direct(_as_dicts(keys[i][1]), gen)  # type: ignore[arg-type]
                except TemplateError as exc:
                    out[i] = RecordError("", f"the chat template failed: {exc}")
            continue
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            dicts = [_as_dicts(keys[i][1]) for i in chunk]  # type: ignore[arg-type]
            try:
                texts = tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=gen,
                                                      **_tools(tools))
            except TemplateError:  # find which ones fail, one by one
                texts = []
                for one in dicts:
                    try:
                        texts.append(tokenizer.apply_chat_template(
                            one, tokenize=False, add_generation_prompt=gen, **_tools(tools)))
                    except TemplateError as exc:
                        texts.append(RecordError("", f"the chat template failed: {exc}"))
            for i, text in zip(chunk, texts):
                out[i] = text
    return out


def render_chat_rows(tokenizer: Any, keys: Sequence[Slot], rows: Sequence[Sequence[int]],
                     split: Any) -> list[Rendered]:
    """The chat slots of whole pairs (``rows``: the positions of a pair's prompt, chosen and
    rejected in ``keys``), each distinct text encoded once and a pair's prompt once: each
    conversation's ids are its prompt's ids through the prompt's last added token
    (``<|im_start|>``), where the tokenizer cuts text into pieces it encodes apart, then the ids
    of the rest of its text."""
    wanted = [i for row in rows for i in row]
    texts: list[str | RecordError] = [""] * len(keys)
    for i, text in zip(wanted, render_texts(tokenizer, [keys[i] for i in wanted])):
        texts[i] = text
    done: list[Rendered] = [t if isinstance(t, RecordError) else [] for t in texts]
    pieces: dict[str, list[int]] = {}  # each distinct text to encode -> its ids
    heads: dict[str, str] = {}  # each prompt text -> its head
    for row in rows:
        prompt = texts[row[0]]
        if isinstance(prompt, str) and prompt not in heads:
            heads[prompt] = head = split.head(prompt)
            pieces[head] = pieces[prompt[len(head):]] = []
    cut: list[tuple[int, str, str]] = []  # (position, head, rest): its ids are theirs joined
    for row in rows:
        prompt = texts[row[0]]
        head = heads[prompt] if isinstance(prompt, str) else ""
        for i in row:
            text = texts[i]
            if isinstance(text, RecordError):
                continue
            # where the template renders the prompt otherwise, the text is encoded whole
            start = head if text.startswith(head) else ""
            pieces[text[len(start):]] = []
            cut.append((i, start, text[len(start):]))
    for text, ids in zip(pieces, split.encode_ids(list(pieces))):
        pieces[text] = ids
    for i, head, rest in cut:
        done[i] = pieces[head] + pieces[rest] if head else pieces[rest]
    return done


class PromptSplitter:
    """Encodes rendered chat texts with the Rust tokenizer, and cuts a text after its last added
    token: added tokens are matched before anything else, so the text before and after one is
    encoded apart, and a conversation's ids start with its prompt's ids up to there.

    Tokens are found as the tokenizer finds those it matches on the raw text (leftmost, longest),
    and a text is cut only after one that takes no whitespace after it (``rstrip``); never where
    some added token matches only as a whole word (whether it matches at the start of the rest
    depends on what came before)."""

    def __init__(self, tokenizer: Any):
        self.backend = tokenizer.backend_tokenizer
        added = list((getattr(tokenizer, "added_tokens_decoder", None) or {}).values())
        raw = [t for t in added if str(t) and not getattr(t, "normalized", False)]
        self.cut_after = {str(t) for t in raw if not getattr(t, "rstrip", False)}
        if any(getattr(t, "single_word", False) for t in added):
            self.cut_after = set()
        found = sorted({str(t) for t in raw}, key=len, reverse=True)
        self.cuts = re.compile("|".join(map(re.escape, found))) if found and self.cut_after else None

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in ids_only(self.backend)(list(texts), add_special_tokens=False)] if texts else []

    def head(self, text: str) -> str:
        """``text`` through its last added token ("" when it has none): leftmost-longest matches
        from the start, as the tokenizer matches added tokens."""
        if self.cuts is None:
            return ""
        end = max((m.end() for m in self.cuts.finditer(text) if m.group() in self.cut_after), default=0)
        return text[:end]


@probed("_preftune_split")
def prompt_splitter(tokenizer: Any) -> PromptSplitter | None:
    """A :class:`PromptSplitter` where the direct encoder is exact and splitting at the last added
    token gives the same ids as encoding whole, on probe conversations; else None."""
    split = None
    if direct_encoder(tokenizer) is not None:
        split = PromptSplitter(tokenizer)
        try:
            for probe in PROBES:
                for cut in (i for i in range(1, len(probe)) if probe[i]["role"] == "assistant"):
                    prompt = tokenizer.apply_chat_template(probe[:cut], tokenize=False,
                                                           add_generation_prompt=True)
                    whole = tokenizer.apply_chat_template(probe[: cut + 1], tokenize=False)
                    head = split.head(prompt)
                    head_ids, rest, tail, *whole_ids = split.encode_ids(
                        [head, prompt[len(head):], whole[len(head):], prompt, whole])
                    if not whole.startswith(head) or whole_ids != [head_ids + rest, head_ids + tail]:
                        split = None
                        break
                if split is None:
                    break
        except Exception:  # a template that refuses a probe: encode conversations whole
            split = None
    return split
