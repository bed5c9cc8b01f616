"""Reading, parsing, checking and tokenizing preference data.

Every problem is reported with its file, line and field; nothing is dropped silently. A pair is
tokenized by rendering the whole conversation once with the tokenizer's chat template and masking
by the length of the rendered prompt, which must be a token prefix of both conversations. Many
pairs are rendered in batches (a Hugging Face tokenizer then encodes on all cores), each distinct
conversation once; the result is exactly that of tokenizing each pair alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, DataError, RecordError
from .sources import read_records
from .types import DatasetFormat, Message, PreferencePair, Source, TokenizedPair


class AutoFormat:
    """Picks, for each record, the one registered format whose keys it has."""

    def __init__(self, formats: dict[str, DatasetFormat]):
        self.formats = formats

    def matches(self, record: dict[str, Any]) -> bool:
        return any(f.matches(record) for f in self.formats.values())

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        return self.select(record).parse(record)

    def select(self, record: dict[str, Any]) -> DatasetFormat:
        """The one format that matches ``record``; a :class:`RecordError` otherwise."""
        hits = [name for name, f in self.formats.items() if f.matches(record)]
        if len(hits) > 1:
            raise RecordError("", f"record matches several formats ({', '.join(hits)}); set format")
        if not hits:
            raise RecordError(
                "",
                f"no format matches a record with keys {sorted(record)}; "
                f"known formats: {', '.join(sorted(self.formats))}",
            )
        return self.formats[hits[0]]


def make_format(registry: Any, config: Any) -> DatasetFormat:
    """The run's dataset format; ``auto`` tries every registered format by its keys."""
    if config.format != "auto":
        return registry.build("format", config.format, config)
    return AutoFormat({n: registry.build("format", n, config) for n in registry.names("format")})


ROLES = ("system", "user", "assistant")  # what chat templates render; tool turns are not supported yet


def check_pair(pair: PreferencePair, field_names: dict[str, str] | None = None) -> None:
    """Checks every format gets for free: a prompt, known roles, no empty completion, responses
    of assistant turns only, chosen differs from rejected. ``field_names`` maps
    prompt/chosen/rejected to the record's own field names."""
    names = field_names or {}
    if not pair.prompt:
        raise RecordError(names.get("prompt", "prompt"), "the prompt has no messages")
    for side in ("prompt", "chosen", "rejected"):
        for i, message in enumerate(getattr(pair, side)):
            if message.role not in ROLES:
                raise RecordError(names.get(side, side), (
                    f"message {i} of the {side} has role {message.role!r}; preftune trains on "
                    f"{', '.join(ROLES)} turns (tool calls and results are not supported yet)"))
    for side in ("chosen", "rejected"):
        messages = getattr(pair, side)
        if not messages:
            raise RecordError(names.get(side, side), f"the {side} response has no messages")
        for i, message in enumerate(messages):
            if message.role != "assistant":
                raise RecordError(names.get(side, side), f"the {side} response (message {i}) is a "
                                  f"{message.role!r} turn; a response holds assistant turns only")
            if not message.content.strip():
                raise RecordError(names.get(side, side), f"the {side} response (message {i}) is empty")
    if pair.chosen == pair.rejected:
        raise RecordError(names.get("rejected", "rejected"), "chosen and rejected responses are identical")


@dataclass
class ParseResult:
    """The pairs of one file and every problem found in it."""

    pairs: list[PreferencePair] = field(default_factory=list)
    problems: list[tuple[str, int, str, str]] = field(default_factory=list)
    records: int = 0


def parse_file(path: str | Path, fmt: DatasetFormat) -> ParseResult:
    """Parse and check every record of a dataset file (JSONL, or JSONL.gz), collecting all
    problems (not just the first)."""
    result = ParseResult()
    for where, record, error in read_records(path):
        result.records += 1
        try:
            if error is not None:
                raise error
            if not isinstance(record, dict):
                raise RecordError("", f"expected a JSON object, got {type(record).__name__}")
            chosen_format = fmt.select(record) if isinstance(fmt, AutoFormat) else fmt
            pair = chosen_format.parse(record)
            check_pair(pair, getattr(chosen_format, "field_names", None))
        except RecordError as exc:
            result.problems.append((where.file, where.line, exc.field, exc.message))
            continue
        result.pairs.append(PreferencePair(pair.prompt, pair.chosen, pair.rejected, where))
    return result


def load_pairs(path: str | Path, fmt: DatasetFormat) -> list[PreferencePair]:
    """Parse a dataset file; any bad line is a :class:`DataError` listing all of them."""
    result = parse_file(path, fmt)
    if result.problems:
        raise DataError(result.problems, total=result.records)
    if not result.pairs:
        raise DataError([(str(path), 0, "", "the file holds no preference pairs")])
    return result.pairs


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


def content(pair: TokenizedPair) -> tuple[tuple[int, ...], ...]:
    """What makes two pairs the same pair, whatever the files or formats they came from."""
    return pair.prompt, pair.chosen, pair.rejected


def check_held_out(pairs: Sequence[TokenizedPair], train: Sequence[int], held: Sequence[int]) -> None:
    """Refuse held-out pairs that are also training pairs (same tokens, whatever the files or
    formats): accuracy on them would measure memory, not preference."""
    seen = {content(p): p.source for p in (pairs[i] for i in train)}
    shared = [(pairs[i].source, seen[key]) for i in held if (key := content(pairs[i])) in seen]
    if shared:
        where = "; ".join(f"{a} = {b}" for a, b in shared[:5]) + (" ..." if len(shared) > 5 else "")
        raise ConfigError(f"eval_dataset shares {len(shared)} of its {len(held)} pairs with dataset "
                          f"(held-out = training): {where}")


def keep_repeats_in_train(pairs: Sequence[TokenizedPair], train: list[int],
                          held: list[int]) -> tuple[list[int], list[int], int]:
    """A pair the data set holds more than once, split to both sides, is trained on and not held
    out (accuracy on it would measure memory). Returns train, held-out and how many moved."""
    seen = {content(pairs[i]) for i in train}
    repeats = [i for i in held if content(pairs[i]) in seen]
    if not repeats:
        return train, held, 0
    return sorted(train + repeats), [i for i in held if i not in set(repeats)], len(repeats)


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into train and held-out indices, a pure function of ``seed``."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(n * fraction))
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def no_training_pairs(config: Any, kept: int, held: int, report: Any) -> str:
    """Why no pair is left to train on: the held-out split took them, or tokenization did."""
    if held and not config.eval_dataset:
        return (f"eval_fraction = {config.eval_fraction} holds out {held} of the {kept} pairs of "
                f"{config.dataset}, leaving none to train on; lower eval_fraction, or set eval_dataset")
    return (f"no training pairs left in {config.dataset} after tokenization ({len(report.dropped)} "
            f"dropped: the prompt alone is at least max_seq_len = {config.max_seq_len} tokens)")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of training pairs in ``epoch``: a pure function of seed and epoch."""
    # modulo 2**64, torch's seed range: the same orders as ever for seeds below ~1.8e13
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch + 1) % 2**64)
    return torch.randperm(n, generator=generator).tolist()


def length_batches(pairs: Sequence[TokenizedPair], indices: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` sorted by length and cut into batches of ``size``: little padding, and the same
    batches every time, so evaluation and the reference pass see identically shaped inputs."""
    ordered = sorted(indices, key=lambda i: (len(pairs[i].prompt) + len(pairs[i].chosen), i))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
