"""Tokenized pairs held as int32 arrays (memory-mapped from the cache), built into
:class:`TokenizedPair` objects only when a micro-batch asks for them.

A :class:`PairTable` is a ``Sequence[TokenizedPair]``: ``table[i]`` builds pair ``i`` from one
flat int32 token array and an ``[n, 3]`` table of prompt, chosen and rejected lengths. What whole-
set code needs (lengths for batching, a digest per pair for the held-out checks) is read from the
arrays without building pairs, so a million pairs cost their tokens' bytes, not Python objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, overload

import numpy

from ..types import Source, TokenizedPair

DIGEST = 16  # bytes of a pair's content digest (blake2b)


class PairTable(Sequence[TokenizedPair]):
    """``n`` tokenized pairs over a flat int32 ``tokens`` array (a memory map or an array)."""

    def __init__(self, tokens: numpy.ndarray, lengths: numpy.ndarray, sources: Sequence[Source | None],
                 truncated: numpy.ndarray, digests: numpy.ndarray):
        self.tokens, self.lengths = tokens, lengths.reshape(-1, 3).astype(numpy.int64)
        self.sources, self.truncated, self.digests = sources, truncated, digests
        ends = numpy.cumsum(self.lengths.reshape(-1))
        self.starts = (ends - self.lengths.reshape(-1)).reshape(-1, 3)

    @classmethod
    def of(cls, pairs: Sequence[TokenizedPair]) -> PairTable:
        """A table of pairs built in memory (tests, small data)."""
        packed = Packed.of(pairs)
        return cls(packed.tokens, packed.lengths, packed.sources, numpy.array(packed.truncated, dtype=bool),
                   numpy.frombuffer(packed.digests, dtype=numpy.uint8).reshape(-1, DIGEST))

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @overload
    def __getitem__(self, index: int) -> TokenizedPair: ...

    @overload
    def __getitem__(self, index: slice) -> list[TokenizedPair]: ...

    def __getitem__(self, index: int | slice) -> TokenizedPair | list[TokenizedPair]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        prompt, chosen, rejected = (
            tuple(self.tokens[a : a + n].tolist()) for a, n in zip(self.starts[index], self.lengths[index]))
        return TokenizedPair(prompt, chosen, rejected, (1.0,) * len(chosen), (1.0,) * len(rejected),
                             self.sources[index], bool(self.truncated[index]))

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same pairs (a list, another table)."""
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def digest(self, index: int) -> bytes:
        return self.digests[index].tobytes()

    def sha256(self) -> str:
        """sha256 of the pairs' content, in order (keys the reference cache and checkpoints)."""
        digest = hashlib.sha256()
        digest.update(numpy.ascontiguousarray(self.digests).tobytes())
        return digest.hexdigest()


@dataclass
class Packed:
    """Tokenized pairs as arrays, the form a worker hands them back in: flat int32 tokens, their
    ``[n, 3]`` lengths, a digest per pair, their sources and truncation flags."""

    tokens: numpy.ndarray
    lengths: numpy.ndarray
    digests: bytes
    sources: list[Source | None]
    truncated: list[bool]

    @classmethod
    def of(cls, pairs: Sequence[TokenizedPair]) -> Packed:
        seqs = [seq for p in pairs for seq in (p.prompt, p.chosen, p.rejected)]
        sizes = [len(seq) for seq in seqs]
        flat = numpy.fromiter(chain.from_iterable(seqs), dtype=numpy.int32, count=sum(sizes))
        lengths = numpy.array(sizes, dtype=numpy.int64).reshape(-1, 3)
        return cls(flat, lengths, digests_of(sizes, flat), [p.source for p in pairs],
                   [p.truncated for p in pairs])

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def head(self, count: int) -> Packed:
        """The first ``count`` pairs."""
        size = int(self.lengths[:count].sum())
        return Packed(self.tokens[:size], self.lengths[:count], self.digests[: count * DIGEST],
                      self.sources[:count], self.truncated[:count])


def digests_of(sizes: Sequence[int], flat: numpy.ndarray) -> bytes:
    """What makes two pairs the same pair, whatever the files or formats they came from: for each
    pair of a flat token array (``sizes``: the length of each pair's prompt, chosen and rejected
    in turn), a blake2b digest of each part's length (4 bytes, little-endian) then its tokens
    (int32, little-endian); the digests joined, in one pass over the tokens' bytes."""
    data = memoryview(numpy.ascontiguousarray(flat, dtype="<i4")).cast("B")
    out, start = [], 0
    for i in range(0, len(sizes), 3):
        digest = hashlib.blake2b(digest_size=DIGEST)
        for n in sizes[i : i + 3]:
            digest.update(n.to_bytes(4, "little"))
            digest.update(data[start : start + 4 * n])
            start += 4 * n
        out.append(digest.digest())
    return b"".join(out)


class TokenWriter:
    """Appends tokenized pairs to an int32 token file as they are made (a million pairs never sit
    in memory as Python objects); :meth:`table` maps the file back."""

    def __init__(self, path: Path):
        self.path = path
        self.handle: Any = open(path, "wb")
        self.lengths: list[numpy.ndarray] = []
        self.digests: list[bytes] = []
        self.sources: list[Source | None] = []
        self.truncated: list[bool] = []
        self.count = 0

    def add(self, packed: Packed) -> None:
        if not len(packed):
            return
        self.handle.write(packed.tokens.astype(numpy.int32, copy=False).tobytes())
        self.lengths.append(packed.lengths)
        self.digests.append(packed.digests)
        self.sources += packed.sources
        self.truncated += packed.truncated
        self.count += len(packed)

    def close(self) -> None:
        self.handle.close()

    def table(self) -> PairTable:
        """The pairs written, their tokens memory-mapped from the file."""
        self.close()
        lengths = numpy.concatenate(self.lengths) if self.lengths else numpy.zeros((0, 3), numpy.int64)
        return PairTable(map_tokens(self.path, int(lengths.sum())), lengths, self.sources,
                         numpy.array(self.truncated, dtype=bool),
                         numpy.frombuffer(b"".join(self.digests), dtype=numpy.uint8).reshape(-1, DIGEST))


def map_tokens(path: Path, count: int) -> numpy.ndarray:
    """The int32 tokens of ``path``, memory-mapped read-only; a ``ValueError`` when the file does
    not hold exactly ``count`` of them."""
    size = path.stat().st_size
    if size != 4 * count:
        raise ValueError(f"{path} holds {size} bytes, expected {4 * count} ({count} tokens)")
    if count == 0:
        return numpy.zeros(0, dtype=numpy.int32)
    return numpy.memmap(path, dtype=numpy.int32, mode="r", shape=(count,))
