"""Tokenizing preference pairs.

A pair is tokenized by rendering the whole conversation once with the tokenizer's chat template and
masking by the length of the rendered prompt, which must be a token prefix of both conversations.
Many pairs are rendered in batches (a Hugging Face tokenizer then encodes on all cores), each
distinct conversation once; the result is exactly that of tokenizing each pair alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..errors import DataError, RecordError
from ..types import Message, PreferencePair, Source, TokenizedPair

SIDES = ("chosen", "rejected")


CHUNK = 512  # conversations per batched template call: bounds the memory of the encodings


PAIRS_PER_STEP = 2048  # pairs rendered before they are assembled: bounds the memory of the ids


Rendered = list[int] | RecordError  # token ids, or why the template could not render them


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _ids(out: Any) -> Any:
    return out["input_ids"] if hasattr(out, "keys") else out


def render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(
        _as_dicts(messages), tokenize=True, add_generation_prompt=generation_prompt
    )
    return list(_ids(out))


def try_render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool,
               field: str) -> Rendered:
    """:func:`render`, with an error the template raises (e.g. roles that must alternate)
    returned as a :class:`RecordError` naming ``field``."""
    from jinja2 import TemplateError

    try:
        return render(tokenizer, messages, generation_prompt)
    except TemplateError as exc:
        return RecordError(field, f"the chat template failed: {exc}")


def render_many(tokenizer: Any, conversations: Sequence[Sequence[Message]],
                generation_prompt: bool) -> list[Rendered]:
    """:func:`try_render` of each conversation, batched for a Hugging Face tokenizer (its batch
    path renders and encodes exactly as one-by-one calls do, and encodes on all cores)."""
    from jinja2 import TemplateError
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return [try_render(tokenizer, c, generation_prompt, "") for c in conversations]
    out: list[Rendered] = []
    for start in range(0, len(conversations), CHUNK):
        chunk = conversations[start : start + CHUNK]
        try:
            batch = tokenizer.apply_chat_template([_as_dicts(c) for c in chunk], tokenize=True,
                                                  add_generation_prompt=generation_prompt)
        except TemplateError:  # find which ones fail, one by one
            out.extend(try_render(tokenizer, c, generation_prompt, "") for c in chunk)
        else:
            out.extend(list(ids) for ids in _ids(batch))
    return out


def _unwrap(rendered: Rendered) -> list[int]:
    """The token ids, or the render's error raised."""
    if isinstance(rendered, RecordError):
        raise rendered
    return rendered


def assemble(pair: PreferencePair, prompt: Rendered, fulls: Sequence[Rendered],
             max_seq_len: int) -> TokenizedPair | None:
    """The tokenized pair from its rendered prompt and its two rendered conversations (chosen,
    rejected); None when the prompt alone leaves no room for a completion token. Raises the
    pair's first problem as a :class:`RecordError`."""
    prompt = _unwrap(prompt)
    completions = []
    for side, rendered in zip(SIDES, fulls):
        full = _unwrap(rendered)
        if full[: len(prompt)] != prompt:
            at = next((i for i, (a, b) in enumerate(zip(full, prompt)) if a != b), len(full))
            raise RecordError(
                side,
                "the chat template does not render the prompt as a token prefix of the "
                f"conversation (they differ at token {at}); the loss boundary would be wrong",
            )
        completions.append(full[len(prompt) :])
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


def control_tokens(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern matching the tokenizer's special tokens (``<|im_end|>``, ``</s>``...) in text."""
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    specials = {t for t in specials if t}
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None


def check_control_tokens(pair: PreferencePair, pattern: re.Pattern[str] | None) -> None:
    """Refuse message text holding the chat template's own control tokens: rendered, they would
    become real turn boundaries, a turn injected into the training data."""
    if pattern is None:
        return
    for side in ("prompt", *SIDES):
        for i, message in enumerate(getattr(pair, side)):
            found = pattern.search(message.content)
            if found:
                raise RecordError(side, f"message {i} contains the tokenizer's control token "
                                  f"{found.group()!r}; as text it would end or start a turn")


def tokenize_pair(tokenizer: Any, pair: PreferencePair, max_seq_len: int) -> TokenizedPair | None:
    """Tokenize a pair; None when the prompt alone leaves no room for a completion token.

    Completions longer than ``max_seq_len - len(prompt)`` are truncated from their end.
    """
    check_control_tokens(pair, control_tokens(tokenizer))
    prompt = try_render(tokenizer, pair.prompt, True, "prompt")
    fulls = [try_render(tokenizer, pair.prompt + getattr(pair, side), False, side) for side in SIDES]
    return assemble(pair, prompt, fulls, max_seq_len)


def render_pairs(tokenizer: Any, pairs: Sequence[PreferencePair]) -> list[tuple[Rendered, ...]]:
    """``(prompt, prompt + chosen, prompt + rejected)`` of each pair, rendered in batches; a
    conversation that several pairs share (a repeated prompt) is rendered once."""
    slots = [[(p.prompt, True)] + [(p.prompt + getattr(p, s), False) for s in SIDES] for p in pairs]
    unique = dict.fromkeys(key for row in slots for key in row)  # an ordered set
    done: dict[tuple[tuple[Message, ...], bool], Rendered] = {}
    for gen in (True, False):
        todo = [key for key in unique if key[1] is gen]
        done.update(zip(todo, render_many(tokenizer, [key[0] for key in todo], gen)))
    return [tuple(_named(done[key], f) for key, f in zip(row, ("prompt",) + SIDES)) for row in slots]


def _named(rendered: Rendered, field_name: str) -> Rendered:
    """A render error as this slot's field names it (one conversation can fill several slots)."""
    return RecordError(field_name, rendered.message) if isinstance(rendered, RecordError) else rendered


@dataclass
class TokenizeReport:
    """What tokenization had to change: pairs dropped (prompt too long) and truncated."""

    dropped: list[Source | None] = field(default_factory=list)
    truncated: list[Source | None] = field(default_factory=list)

    def lines(self, max_seq_len: int) -> list[str]:
        out = []
        for what, items in (("dropped: the prompt alone is at least", self.dropped),
                            ("truncated: the completion made the sequence longer than", self.truncated)):
            if items:
                where = ", ".join(str(s) for s in items[:5]) + (" ..." if len(items) > 5 else "")
                out.append(f"{len(items)} pair(s) {what} max_seq_len={max_seq_len}: {where}")
        return out


def tokenize_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_seq_len: int, *, progress: bool = False
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenize all pairs, as :func:`tokenize_pair` does each but rendered in batches; template
    problems are a :class:`DataError` listing every line."""
    out, report, problems = [], TokenizeReport(), []
    pattern = control_tokens(tokenizer)
    with tqdm(total=len(pairs), desc="tokenizing", unit="pair", disable=None if progress else True) as bar:
        for start in range(0, len(pairs), PAIRS_PER_STEP):
            chunk = pairs[start : start + PAIRS_PER_STEP]
            for pair, (prompt, *fulls) in zip(chunk, render_pairs(tokenizer, chunk)):
                try:
                    check_control_tokens(pair, pattern)
                    tokenized = assemble(pair, prompt, fulls, max_seq_len)
                except RecordError as exc:
                    src = pair.source or Source("?", 0)
                    problems.append((src.file, src.line, exc.field, exc.message))
                    continue
                if tokenized is None:
                    report.dropped.append(pair.source)
                    continue
                if tokenized.truncated:
                    report.truncated.append(pair.source)
                out.append(tokenized)
            bar.update(len(chunk))
    if problems:
        error = DataError(problems, total=len(pairs))
        error.report = report  # what was truncated or dropped among the good pairs
        raise error
    return out, report
