"""Tokenizing preference pairs.

A pair is tokenized by rendering the whole conversation once with the tokenizer's chat template and
masking by the length of the rendered prompt, which must be a token prefix of both conversations.
Many pairs are rendered in batches (a Hugging Face tokenizer then encodes on all cores), each
distinct conversation once; the result is exactly that of tokenizing each pair alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from ..errors import DataError, Problem, RecordError
from ..types import Message, PreferencePair, Source, TokenizedPair

SIDES = ("chosen", "rejected")


CHUNK = 512  # conversations per batched template call: bounds the memory of the encodings


PAIRS_PER_STEP = 2048  # pairs rendered before they are assembled: bounds the memory of the ids


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


def direct_encoder(tokenizer: Any) -> Any:
    """A function from rendered chat texts to their ids by the Rust tokenizer's ``encode_batch``,
    or None where that would not give exactly what ``apply_chat_template(tokenize=True)`` gives:
    no backend, truncation or padding set on it, special tokens split, or any probe conversation
    encoded differently. Decided once per tokenizer."""
    cached = getattr(tokenizer, "_preftune_direct", "unset")
    if cached != "unset":
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = None
    if backend is not None and backend.truncation is None and backend.padding is None \
            and not getattr(tokenizer, "split_special_tokens", False) \
            and not getattr(backend, "encode_special_tokens", False):
        def encode(texts: Sequence[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
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
    try:
        tokenizer._preftune_direct = encode
    except AttributeError:
        pass
    return encode


def encode_many(tokenizer: Any, texts: Sequence[str]) -> list[Rendered]:
    """Token ids of plain texts (text pairs: no chat template), special tokens added as the
    tokenizer adds them (a BOS), as TRL tokenizes its "standard" records."""
    out: list[Rendered] = []
    for start in range(0, len(texts), CHUNK):
        out.extend(list(ids) for ids in _ids(tokenizer(list(texts[start : start + CHUNK]))))
    return out


def _unwrap(rendered: Rendered) -> list[int]:
    """The token ids, or the render's error raised."""
    if isinstance(rendered, RecordError):
        raise rendered
    return rendered


@dataclass(frozen=True)
class Vocab:
    """What tokenizing needs to know of a tokenizer, found once: the text of its control tokens
    (and of its template's plain-text turn markers), its special token ids, its EOS text."""

    control: re.Pattern[str] | None
    special_ids: frozenset[int]
    eos: str

    @classmethod
    def of(cls, tokenizer: Any) -> Vocab:
        ids = set(getattr(tokenizer, "all_special_ids", None) or [])
        for index, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(token, "special", False):
                ids.add(int(index))
        return cls(control_tokens(tokenizer), frozenset(ids), getattr(tokenizer, "eos_token", None) or "")


def end_of_turn(completion: list[int], vocab: Vocab, tokenizer: Any) -> list[int]:
    """The completion through its last control token (``<|im_end|>``, ``<end_of_turn>``), without
    the whitespace a template writes after it: a model stops at the control token and never
    generates that newline, so it is not trained on (as the cookbook's renderers do)."""
    last = next((i for i in range(len(completion) - 1, -1, -1) if completion[i] in vocab.special_ids), None)
    if last is None or last == len(completion) - 1:
        return completion
    if tokenizer.decode(completion[last + 1 :]).strip():
        return completion  # text after the control token is real content: keep it
    return completion[: last + 1]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assemble(pair: PreferencePair, prompt: Rendered, fulls: Sequence[Rendered], max_seq_len: int,
             vocab: Vocab | None = None, tokenizer: Any = None) -> TokenizedPair | None:
    """The tokenized pair from its rendered prompt and its two rendered conversations (chosen,
    rejected); None when the prompt alone leaves no room for a completion token. Raises the
    pair's first problem as a :class:`RecordError`.

    A chat pair's prompt must be a token prefix of both conversations. A text pair's completion
    starts where the tokens of prompt and prompt + completion part (as TRL splits them: the
    prompt's last characters may merge with the completion's first into one token)."""
    prompt = _unwrap(prompt)
    full_ids = [_unwrap(rendered) for rendered in fulls]
    if pair.is_text:
        prompt = prompt[: min(common_prefix(prompt, full) for full in full_ids)]
    for side, full in zip(SIDES, full_ids):
        if full[: len(prompt)] != prompt:
            raise RecordError(
                side,
                "the chat template does not render the prompt as a token prefix of the "
                f"conversation (they differ at token {common_prefix(full, prompt)}); the loss "
                "boundary would be wrong",
            )
    completions = [full[len(prompt) :] for full in full_ids]
    if vocab is not None and not pair.is_text:
        completions = [end_of_turn(c, vocab, tokenizer) for c in completions]
    if len(prompt) >= max_seq_len:
        return None
    room = max_seq_len - len(prompt)
    chosen, rejected = (c[:room] for c in completions)
    if not chosen or not rejected:
        raise RecordError("chosen" if not chosen else "rejected", "the completion has no tokens")
    if chosen == rejected:  # they differ only past max_seq_len: no preference left to learn
        raise RecordError("rejected", f"chosen and rejected are identical after truncation to "
                          f"max_seq_len={max_seq_len} (prompt {len(prompt)} tokens); raise "
                          "max_seq_len or remove the pair")
    return TokenizedPair(
        tuple(prompt),
        tuple(chosen),
        tuple(rejected),
        (1.0,) * len(chosen),
        (1.0,) * len(rejected),
        pair.source,
        truncated=any(len(c) > room for c in completions),
    )


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


def slots(pair: PreferencePair, eos: str) -> list[Slot]:
    """What is rendered for a pair: its prompt, prompt + chosen, prompt + rejected. A text pair's
    completions end in EOS (added when missing, as TRL does)."""
    if pair.is_text:
        ends = [c if c.endswith(eos) else c + eos for c in (pair.chosen, pair.rejected)]
        return [("text", pair.prompt, False, None)] + [("text", pair.prompt + c, False, None) for c in ends]
    return [("chat", pair.prompt, True, pair.tools)] + [
        ("chat", pair.prompt + getattr(pair, s), False, pair.tools) for s in SIDES]


def render_slots(tokenizer: Any, keys: Iterable[Slot]) -> dict[Slot, Rendered]:
    """Every distinct slot rendered once, in batches of one kind, generation flag and tool list."""
    groups: dict[tuple[str, bool, str | None], list[Slot]] = {}
    for key in dict.fromkeys(keys):  # an ordered set
        groups.setdefault((key[0], key[2], key[3]), []).append(key)
    done: dict[Slot, Rendered] = {}
    for (kind, gen, tools), todo in groups.items():
        values = [key[1] for key in todo]
        rendered = encode_many(tokenizer, values) if kind == "text" else \
            render_many(tokenizer, values, gen, tools)
        done.update(zip(todo, rendered))
    return done


def tokenize_pair(tokenizer: Any, pair: PreferencePair, max_seq_len: int) -> TokenizedPair | None:
    """Tokenize a pair; None when the prompt alone leaves no room for a completion token.

    Completions longer than ``max_seq_len - len(prompt)`` are truncated from their end.
    """
    vocab = Vocab.of(tokenizer)
    check_control_tokens(pair, vocab.control, vocab.eos)
    check_template_reads(tokenizer, pair)
    prompt, *fulls = render_pairs(tokenizer, [pair], vocab)[0]
    return assemble(pair, prompt, fulls, max_seq_len, vocab, tokenizer)


def render_pairs(tokenizer: Any, pairs: Sequence[PreferencePair],
                 vocab: Vocab | None = None) -> list[tuple[Rendered, ...]]:
    """``(prompt, prompt + chosen, prompt + rejected)`` of each pair, rendered in batches; a
    conversation that several pairs share (a repeated prompt) is rendered once."""
    eos = (vocab or Vocab.of(tokenizer)).eos
    rows = [slots(p, eos) for p in pairs]
    split = prompt_splitter(tokenizer)
    chat = [row for row in rows if row[0][0] == "chat"] if split is not None else []
    done = render_slots(tokenizer, (key for row in rows if not (chat and row[0][0] == "chat") for key in row))
    if chat:
        done.update(render_chat_rows(tokenizer, chat, split))
    return [tuple(_named(done[key], f) for key, f in zip(row, ("prompt",) + SIDES)) for row in rows]


def render_texts(tokenizer: Any, keys: Sequence[Slot]) -> dict[Slot, str | RecordError]:
    """Each chat slot's rendered text (not encoded), batched by generation flag and tools."""
    from jinja2 import TemplateError

    groups: dict[tuple[bool, str | None], list[Slot]] = {}
    for key in keys:
        groups.setdefault((key[2], key[3]), []).append(key)
    out: dict[Slot, str | RecordError] = {}
    for (gen, tools), todo in groups.items():
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            dicts = [_as_dicts(key[1]) for key in chunk]  # type: ignore[arg-type]
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
            out.update(zip(chunk, texts))
    return out


def render_chat_rows(tokenizer: Any, rows: Sequence[list[Slot]], split: Any) -> dict[Slot, Rendered]:
    """Chat slots of whole pairs, the prompt encoded once: each conversation's ids are its
    prompt's ids up to the prompt's last added token (``<|im_start|>``), where the tokenizer cuts
    text into pieces it encodes apart, then the ids of the rest of the conversation's text."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    texts = render_texts(tokenizer, keys)
    prompts = list(dict.fromkeys(row[0] for row in rows if isinstance(texts[row[0]], str)))
    encoded = split.encode([texts[k] for k in prompts])  # type: ignore[misc]
    done: dict[Slot, Rendered] = {k: e.ids for k, e in zip(prompts, encoded)}
    heads = {k: split.head(texts[k], e) for k, e in zip(prompts, encoded)}  # (text, ids) of each head
    tails: list[tuple[Slot, list[int], str]] = []
    for row in rows:
        for key in row[1:]:
            text = texts[key]
            if key in done or isinstance(text, RecordError):
                continue
            head_text, head_ids = heads.get(row[0], ("", []))
            if not text.startswith(head_text):  # the template renders the prompt otherwise here
                head_text, head_ids = "", []
            tails.append((key, head_ids, text[len(head_text):]))
    for (key, head_ids, _), ids in zip(tails, split.encode_ids([t for _, _, t in tails])):
        done[key] = head_ids + ids
    done.update({k: t for k, t in texts.items() if isinstance(t, RecordError)})
    return done


class PromptSplitter:
    """Encodes rendered chat texts with the Rust tokenizer, and cuts a text at its last added
    token: added tokens are matched before anything else, so the text before and after one is
    encoded apart, and a conversation's ids start with its prompt's ids up to there."""

    def __init__(self, tokenizer: Any):
        self.backend = tokenizer.backend_tokenizer
        added = [str(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()]
        added = sorted({t for t in added if t}, key=len, reverse=True)
        self.added = re.compile("|".join(map(re.escape, added))) if added else None

    def encode(self, texts: Sequence[str]) -> list[Any]:
        return self.backend.encode_batch(list(texts), add_special_tokens=False) if texts else []

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.encode(texts)]

    def head(self, text: str, encoding: Any) -> tuple[str, list[int]]:
        """``text`` through its last added token, and those ids; ("", []) when it has none, or
        when no token ends exactly there."""
        end = max((m.end() for m in self.added.finditer(text)), default=0) if self.added else 0
        if not end:
            return "", []
        last = encoding.char_to_token(end - 1)  # the token holding the added token's last character
        if last is None or encoding.token_to_chars(last)[1] != end:
            return "", []
        return text[:end], encoding.ids[: last + 1]


def prompt_splitter(tokenizer: Any) -> PromptSplitter | None:
    """A :class:`PromptSplitter` where the direct encoder is exact and splitting at the last added
    token gives the same ids as encoding whole, on probe conversations; else None."""
    cached = getattr(tokenizer, "_preftune_split", "unset")
    if cached != "unset":
        return cached
    split = None
    if direct_encoder(tokenizer) is not None:
        split = PromptSplitter(tokenizer)
        try:
            for probe in PROBES:
                for cut in (i for i in range(1, len(probe)) if probe[i]["role"] == "assistant"):
                    prompt = tokenizer.apply_chat_template(probe[:cut], tokenize=False,
                                                           add_generation_prompt=True)
                    whole = tokenizer.apply_chat_template(probe[: cut + 1], tokenize=False)
                    head_text, head_ids = split.head(prompt, split.encode([prompt])[0])
                    tail = split.encode_ids([whole[len(head_text):]])[0]
                    if not whole.startswith(head_text) or head_ids + tail != split.encode_ids([whole])[0]:
                        split = None
                        break
                if split is None:
                    break
        except Exception:  # a template that refuses a probe: encode conversations whole
            split = None
    try:
        tokenizer._preftune_split = split
    except AttributeError:
        pass
    return split


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


def _named(rendered: Rendered, field_name: str) -> Rendered:
    """A render error as this slot's field names it (one conversation can fill several slots)."""
    return RecordError(field_name, rendered.message) if isinstance(rendered, RecordError) else rendered


@dataclass
class TokenizeReport:
    """What tokenization had to change: pairs dropped (prompt too long) and truncated."""

    dropped: list[Source | None] = field(default_factory=list)
    truncated: list[Source | None] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)  # key the template ignores -> pairs

    def lines(self, max_seq_len: int) -> list[str]:
        out = []
        for what, items in (("dropped: the prompt alone is at least", self.dropped),
                            ("truncated: the completion made the sequence longer than", self.truncated)):
            if items:
                where = ", ".join(str(s) for s in items[:5]) + (" ..." if len(items) > 5 else "")
                out.append(f"{len(items)} pair(s) {what} max_seq_len={max_seq_len}: {where}")
        if self.ignored:
            keys = ", ".join(f"{k} ({n} pairs)" for k, n in sorted(self.ignored.items()))
            out.append(f"the chat template ignores {keys}: trained without them (template_ignores = allow)")
        return out


def pair_record(pair: PreferencePair) -> dict[str, Any]:
    """A pair as a record, for a problem found after parsing (skipped.jsonl shows it)."""
    def side(value: Any) -> Any:
        return value if isinstance(value, str) else _as_dicts(value)
    return {"prompt": side(pair.prompt), "chosen": side(pair.chosen), "rejected": side(pair.rejected)}


def tokenize_all(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_seq_len: int, *, progress: bool = False,
    ignored: str = "error",
) -> tuple[list[TokenizedPair], TokenizeReport, list[Problem]]:
    """Tokenize all pairs, as :func:`tokenize_pair` does each but rendered in batches; the pairs
    that cannot be tokenized are returned as problems."""
    out, report, problems = [], TokenizeReport(), []
    vocab = Vocab.of(tokenizer)
    with tqdm(total=len(pairs), desc="tokenizing", unit="pair", disable=None if progress else True) as bar:
        for start in range(0, len(pairs), PAIRS_PER_STEP):
            chunk = pairs[start : start + PAIRS_PER_STEP]
            for pair, (prompt, *fulls) in zip(chunk, render_pairs(tokenizer, chunk, vocab)):
                try:
                    check_control_tokens(pair, vocab.control, vocab.eos)
                    lost = check_template_reads(tokenizer, pair, ignored)
                    tokenized = assemble(pair, prompt, fulls, max_seq_len, vocab, tokenizer)
                except RecordError as exc:
                    problems.append(Problem(pair.source or "?", exc.field, exc.message, pair_record(pair)))
                    continue
                if tokenized is None:
                    report.dropped.append(pair.source)
                    continue
                if tokenized.truncated:
                    report.truncated.append(pair.source)
                for key in lost:
                    report.ignored[key] = report.ignored.get(key, 0) + 1
                out.append(tokenized)
            bar.update(len(chunk))
    return out, report, problems


def tokenize_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_seq_len: int, *, progress: bool = False
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """:func:`tokenize_all`; problems are a :class:`DataError` listing every one."""
    out, report, problems = tokenize_all(tokenizer, pairs, max_seq_len, progress=progress)
    if problems:
        error = DataError(problems, total=len(pairs))
        error.report = report  # what was truncated or dropped among the good pairs
        raise error
    return out, report
