"""Ways to lay a micro-batch of tokenized pairs out as model inputs: helpers for backend authors.

Both layouts say, for every completion target token, which input position's output predicts it
(``target_index``), so a backend computes log-probs only where a loss needs them and reduces them
to per-sequence sums with :meth:`Layout.reduce`, whatever the layout was.

- :func:`padded_layout`: one row per sequence (prompt + chosen, prompt + rejected), right-padded,
  a 2D attention mask. Works with every model.
- :func:`shared_layout`: one segment per pair, ``prompt + chosen[:-1] + rejected[:-1]``, so the
  prompt is computed once. Position ids restart for the rejected branch where the chosen branch
  started, and a 4D mask keeps the rejected tokens from seeing the chosen ones. Segments are packed
  into rows no longer than the longest segment (first fit, longest first): fewer rows and less
  padding, and no row's attention costs more than the longest pair's. Needs a model that takes
  custom 4D masks and position ids; a backend checks that numerically before using it.

Target order is the same in both: pair by pair, the chosen targets, then the rejected ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .types import PairLogps, TokenizedPair, TokenLogps

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch of each token of a shared segment


@dataclass
class Layout:
    """Model inputs of a micro-batch and where each completion target's log-prob comes from."""

    input_ids: Tensor  # [R, L] int64
    attention_mask: Tensor  # [R, L] int64 (padded) or [R, 1, L, L] bool, True = may attend
    position_ids: Tensor | None  # [R, L] int64, or None for 0..L-1 in every row
    target_index: Tensor  # [N] flat index into the R * L input positions
    targets: Tensor  # [N] the target token ids
    weights: Tensor  # [N] float32 loss weights of the targets
    sequence: Tensor  # [N] which sequence: pair i's chosen is i, its rejected B + i
    offset: Tensor  # [N] the target's position inside its completion
    counts: Tensor  # [2B] float32 sum of the weights of each sequence
    pairs: int  # B

    @property
    def num_inputs(self) -> int:
        """Input positions the model computes (padding included)."""
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> Layout:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return Layout(**moved)

    def reduce(self, logps_N: Tensor, token_logps: bool = False) -> PairLogps:
        """Per-sequence sums (and, when asked, per-token rows) of the targets' log-probs."""
        weighted_N = logps_N.float() * self.weights
        sums = torch.zeros(2 * self.pairs, dtype=weighted_N.dtype, device=weighted_N.device)
        sums = sums.index_add(0, self.sequence, weighted_N)
        counts = self.counts.to(weighted_N.device)
        tokens = None
        if token_logps:
            width = int(self.offset.max()) + 1 if self.offset.numel() else 0
            rows = torch.zeros((2 * self.pairs, width), dtype=weighted_N.dtype, device=weighted_N.device)
            rows = rows.index_put((self.sequence, self.offset), weighted_N)
            tokens = TokenLogps(rows[: self.pairs], rows[self.pairs :])
        b = self.pairs
        return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:], tokens)


class _Targets:
    """Collects the completion targets of a layout, in order."""

    def __init__(self) -> None:
        self.index: list[int] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.sequence: list[int] = []
        self.offset: list[int] = []

    def add(self, positions: Sequence[int], tokens: Sequence[int], weights: Sequence[float],
            sequence: int) -> None:
        self.index.extend(positions)
        self.tokens.extend(tokens)
        self.weights.extend(weights)
        self.sequence.extend([sequence] * len(tokens))
        self.offset.extend(range(len(tokens)))

    def layout(self, input_ids: Tensor, mask: Tensor, position_ids: Tensor | None,
               pairs: Sequence[TokenizedPair]) -> Layout:
        weights = torch.tensor(self.weights, dtype=torch.float32)
        sequence = torch.tensor(self.sequence, dtype=torch.long)
        counts = torch.zeros(2 * len(pairs), dtype=torch.float32).index_add(0, sequence, weights)
        return Layout(input_ids, mask, position_ids, torch.tensor(self.index, dtype=torch.long),
                      torch.tensor(self.tokens, dtype=torch.long), weights, sequence,
                      torch.tensor(self.offset, dtype=torch.long), counts, len(pairs))


def padded_layout(pairs: Sequence[TokenizedPair], pad_id: int = 0) -> Layout:
    """One right-padded row per sequence: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected."""
    b = len(pairs)
    rows = [list(p.prompt) + list(p.chosen) for p in pairs] + [
        list(p.prompt) + list(p.rejected) for p in pairs]
    width = max(len(r) - 1 for r in rows)
    input_ids = torch.full((2 * b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((2 * b, width), dtype=torch.long)
    for r, tokens in enumerate(rows):
        input_ids[r, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        mask[r, : len(tokens) - 1] = 1
    targets = _Targets()
    for i, pair in enumerate(pairs):
        start = len(pair.prompt) - 1  # the last prompt token predicts the first completion token
        for side, row in (("chosen", i), ("rejected", b + i)):
            completion = getattr(pair, side)
            base = row * width + start
            targets.add(range(base, base + len(completion)), completion,
                        getattr(pair, f"{side}_weights"), row)
    return targets.layout(input_ids, mask, None, pairs)


def segment(pair: TokenizedPair) -> tuple[list[int], list[int], list[int]]:
    """A pair's shared-prompt segment: its tokens, position ids and branches."""
    p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
    tokens = list(pair.prompt) + list(pair.chosen[:-1]) + list(pair.rejected[:-1])
    positions = list(range(p)) + list(range(p, p + c - 1)) + list(range(p, p + r - 1))
    branches = [PROMPT] * p + [CHOSEN] * (c - 1) + [REJECTED] * (r - 1)
    return tokens, positions, branches


def pack(lengths: Sequence[int]) -> list[list[int]]:
    """First-fit, longest first, into rows as long as the longest item: lists of item indices."""
    capacity = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def shared_layout(pairs: Sequence[TokenizedPair], pad_id: int = 0) -> Layout:
    """Pairs as shared-prompt segments packed into rows; see the module docstring."""
    segments = [segment(p) for p in pairs]
    rows = pack([len(s[0]) for s in segments])
    width = max(len(s[0]) for s in segments)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    seg_id = torch.full(shape, -1, dtype=torch.long)  # -1: padding
    branch = torch.zeros(shape, dtype=torch.long)
    start_of = {}
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            tokens, positions, branches = segments[i]
            n = len(tokens)
            input_ids[r, at : at + n] = torch.tensor(tokens)
            position_ids[r, at : at + n] = torch.tensor(positions)
            branch[r, at : at + n] = torch.tensor(branches)
            seg_id[r, at : at + n] = i
            start_of[i] = r * width + at
            at += n
    targets = _Targets()
    b = len(pairs)
    for i, pair in enumerate(pairs):
        p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
        last_prompt = start_of[i] + p - 1
        targets.add(range(last_prompt, last_prompt + c), pair.chosen, pair.chosen_weights, i)
        rejected_inputs = range(start_of[i] + p + c - 1, start_of[i] + p + c + r - 2)
        targets.add([last_prompt, *rejected_inputs], pair.rejected, pair.rejected_weights, b + i)
    return targets.layout(input_ids, segment_mask(seg_id, branch), position_ids, pairs)


def segment_mask(seg_id: Tensor, branch: Tensor) -> Tensor:
    """``[R, 1, L, L]`` bool: a query sees earlier keys of its own segment, except that a branch
    does not see the other branch. Padding sees itself, so no attention row is empty."""
    width = seg_id.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same = seg_id[:, :, None] == seg_id[:, None, :]
    visible = (branch[:, None, :] == PROMPT) | (branch[:, :, None] == branch[:, None, :])
    mask = same & visible & causal
    mask |= torch.eye(width, dtype=torch.bool)
    return mask[:, None]


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as the additive float mask eager attention implementations add to scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
