"""Which pairs train and which are held out, and in what order and batches they are seen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from ..types import TokenizedPair


def content(pair: TokenizedPair) -> tuple[tuple[int, ...], ...]:
    """What makes two pairs the same pair, whatever the files or formats they came from."""
    return pair.prompt, pair.chosen, pair.rejected


def contents(pairs: Sequence[TokenizedPair]) -> Any:
    """``index -> content`` of the pairs, from a table's digests where there are (no pair is built)."""
    digest = getattr(pairs, "digest", None)
    return digest if callable(digest) else (lambda i: content(pairs[i]))


def source_of(pairs: Sequence[TokenizedPair], index: int) -> Any:
    sources = getattr(pairs, "sources", None)
    return sources[index] if sources is not None else pairs[index].source


def check_held_out(pairs: Sequence[TokenizedPair], train: Sequence[int], held: Sequence[int]) -> None:
    """Refuse held-out pairs that are also training pairs (same tokens, whatever the files or
    formats): accuracy on them would measure memory, not preference."""
    key_of = contents(pairs)
    seen = {key_of(i): source_of(pairs, i) for i in train}
    shared = [(source_of(pairs, i), seen[key]) for i in held if (key := key_of(i)) in seen]
    if shared:
        where = "; ".join(f"{a} = {b}" for a, b in shared[:5]) + (" ..." if len(shared) > 5 else "")
        raise ConfigError(f"eval_dataset shares {len(shared)} of its {len(held)} pairs with dataset "
                          f"(held-out = training): {where}")


def keep_repeats_in_train(pairs: Sequence[TokenizedPair], train: list[int],
                          held: list[int]) -> tuple[list[int], list[int], int]:
    """A pair the data set holds more than once, split to both sides, is trained on and not held
    out (accuracy on it would measure memory). Returns train, held-out and how many moved."""
    key_of = contents(pairs)
    seen = {key_of(i) for i in train}
    repeats = [i for i in held if key_of(i) in seen]
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
    lengths = getattr(pairs, "lengths", None)
    if lengths is not None:  # a table: its length columns, no pair built
        size_of = (lengths[:, 0] + lengths[:, 1]).tolist()
        ordered = sorted(indices, key=lambda i: (size_of[i], i))
    else:
        ordered = sorted(indices, key=lambda i: (len(pairs[i].prompt) + len(pairs[i].chosen), i))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
