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

from ..errors import DataError, Problem, RecordError
from ..types import PreferencePair, Source, TokenizedPair
from .render import (  # noqa: F401  (re-exported: the tokenizer's side of tokenizing)
    Rendered,
    Slot,
    _as_dicts,
    direct_encoder,
    encode_many,
    prompt_splitter,
    render,
    render_chat_rows,
    render_many,
    try_render,
)
from .template import (  # noqa: F401
    SIDES,
    check_control_tokens,
    check_template_reads,
    control_tokens,
    template_markers,
)

PAIRS_PER_STEP = 2048  # pairs rendered before they are assembled: bounds the memory of the ids


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
    blank: dict[tuple[int, ...], bool] = field(default_factory=dict, compare=False)  # ids -> all whitespace

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
    after = tuple(completion[last + 1 :])
    if after not in vocab.blank:  # what follows is nearly always the same newline: decoded once
        if len(vocab.blank) >= 4096:
            vocab.blank.clear()
        vocab.blank[after] = not tokenizer.decode(after).strip()
    if not vocab.blank[after]:
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


def slots(pair: PreferencePair, eos: str) -> list[Slot]:
    """What is rendered for a pair: its prompt, prompt + chosen, prompt + rejected. A text pair's
    completions end in EOS (added when missing, as TRL does)."""
    if pair.is_text:
        ends = [c if c.endswith(eos) else c + eos for c in (pair.chosen, pair.rejected)]
        return [("text", pair.prompt, False, None)] + [("text", pair.prompt + c, False, None) for c in ends]
    return [("chat", pair.prompt, True, pair.tools)] + [
        ("chat", pair.prompt + getattr(pair, s), False, pair.tools) for s in SIDES]


def render_slots(tokenizer: Any, keys: Sequence[Slot]) -> list[Rendered]:
    """Each slot rendered, in batches of one kind, generation flag and tool list."""
    groups: dict[tuple[str, bool, str | None], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault((key[0], key[2], key[3]), []).append(i)
    done: list[Rendered] = [[] for _ in keys]
    for (kind, gen, tools), todo in groups.items():
        values = [keys[i][1] for i in todo]
        rendered = encode_many(tokenizer, values) if kind == "text" else \
            render_many(tokenizer, values, gen, tools)
        for i, one in zip(todo, rendered):
            done[i] = one
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
    """``(prompt, prompt + chosen, prompt + rejected)`` of each pair, rendered in batches; where the
    prompt is split off (:func:`prompt_splitter`), a text that several pairs share (a repeated
    prompt) is encoded once. Slots are handled by position: hashing a conversation walks every
    message, which cost more than it saved."""
    eos = (vocab or Vocab.of(tokenizer)).eos
    keys = [key for p in pairs for key in slots(p, eos)]
    rows = [range(i, i + 3) for i in range(0, len(keys), 3)]
    split = prompt_splitter(tokenizer)
    chat = [row for row in rows if keys[row[0]][0] == "chat"] if split is not None else []
    if chat:
        done = render_chat_rows(tokenizer, keys, chat, split)
        text = [i for i, key in enumerate(keys) if key[0] != "chat"]
        for i, rendered in zip(text, render_slots(tokenizer, [keys[i] for i in text])):
            done[i] = rendered
    else:
        done = render_slots(tokenizer, keys)
    return [tuple(_named(done[i], f) for i, f in zip(row, ("prompt",) + SIDES)) for row in rows]


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
