"""Records to token files, a chunk at a time, on ``data_workers`` processes.

A data set is read as chunks of :data:`CHUNK_RECORDS` records. Each chunk is parsed, checked and
tokenized as a whole (its conversations rendered in batches), on a worker process when the data
set has more than one chunk, and its pairs are appended to the token file in the data set's order.
Nothing but one chunk per worker is ever held as Python objects, so the memory of a build does not
grow with the data set. The result is the same whatever the number of workers.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from tqdm.auto import tqdm

from ..errors import Problem, RecordError
from ..types import Read, Source
from .records import parse_records
from .sources import Opened
from .table import Packed, TokenWriter
from .tokenize import TokenizeReport, tokenize_all

CHUNK_RECORDS = 1024  # records parsed and tokenized together: bounds a worker's memory


@dataclass
class Chunk:
    """What one chunk of records became: its good pairs (and the position of each one's record in
    the chunk), its pairs dropped or truncated at max_seq_len, its bad records."""

    records: int
    pairs: Packed = field(default_factory=lambda: Packed.of([]))
    positions: list[int] = field(default_factory=list)
    parsed: int = 0  # records that parsed into a pair (max_pairs counts these)
    parsed_positions: list[int] = field(default_factory=list)
    dropped: list[tuple[int, Source | None]] = field(default_factory=list)
    truncated: list[tuple[int, Source | None]] = field(default_factory=list)
    problems: list[tuple[int, Problem]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    def cut(self, parsed: int) -> Chunk:
        """This chunk up to (and with) the record of its ``parsed``-th good pair: what a reader
        that stops at ``max_pairs`` would have read."""
        last = self.parsed_positions[parsed - 1]
        keep = sum(1 for at in self.positions if at <= last)  # positions ascend: a prefix
        return Chunk(last + 1, self.pairs.head(keep), self.positions[:keep], parsed,
                     self.parsed_positions[:parsed], [d for d in self.dropped if d[0] <= last],
                     [t for t in self.truncated if t[0] <= last],
                     [p for p in self.problems if p[0] <= last], self.ignored)


# what a worker needs, set before the pool forks (a format or tokenizer need not pickle)
_WORK: dict[str, Any] = {}


def work_chunk(reads: list[Read]) -> Chunk:
    """Parse, check and tokenize one chunk of reads (the cyclic garbage collector paused)."""
    with paused_gc():
        return _work_chunk(reads)


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off while a chunk is worked on. Parsing and rendering
    allocate hundreds of thousands of containers a chunk, and each burst set off collections that
    walked the whole heap (the tokenizer's, transformers', torch's objects): 0.58 ms of CPU a pair
    with it, 0.52 without. Reference counting still frees everything at once; only cycles (the
    frames of a raised error) wait for the next collection after the chunk."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects that exist before a build (the tokenizer's, transformers', torch's) kept out
    of the collector's full passes while it runs: each such pass walked them all, 0.15 s, and
    reading records sets them off. Objects made during the build are collected as ever. A
    caller's own freeze is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _work_chunk(reads: list[Read]) -> Chunk:
    fmt, tokenizer, max_seq_len = _WORK["fmt"], _WORK["tokenizer"], _WORK["max_seq_len"]
    ignored = _WORK.get("ignored", "error")
    parsed = parse_records(reads, fmt)
    where = {id(read[0]): i for i, read in enumerate(reads)}  # a record's position in the chunk,
    # by its location object, which its pair, problems and report entries all carry
    chunk = Chunk(len(reads), parsed=len(parsed.pairs),
                  parsed_positions=[where[id(p.source)] for p in parsed.pairs])
    chunk.problems = [(where[id(p.where)], p) for p in parsed.problems]
    if tokenizer is None:  # parsing only
        return chunk
    pairs, report, bad = tokenize_all(tokenizer, parsed.pairs, max_seq_len, ignored=ignored)
    chunk.pairs, chunk.positions = Packed.of(pairs), [where[id(p.source)] for p in pairs]
    chunk.dropped = [(where[id(s)], s) for s in report.dropped]
    chunk.truncated = [(where[id(s)], s) for s in report.truncated]
    chunk.ignored = report.ignored
    chunk.problems = sorted(chunk.problems + [(where[id(p.where)], p) for p in bad],
                            key=lambda item: item[0])
    return chunk


def chunks_of(reads: Iterable[Read], size: int) -> Iterator[list[Read]]:
    """Reads in lists of ``size``; a source's own error type becomes a plain RecordError, which
    always crosses to a worker process (an object that cannot be unpickled there stalls a pool)."""
    iterator = iter(reads)
    while chunk := list(islice(iterator, size)):
        yield [(where, record, None if error is None else RecordError(error.field, error.message))
               for where, record, error in chunk]


def default_workers() -> int:
    """One per CPU core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def worker_pool(workers: int, fmt: Any, tokenizer: Any, max_seq_len: int,
                ignored: str = "error") -> Iterator[Any]:
    """A pool of ``workers`` forked processes that run :func:`work_chunk` (None for one worker,
    or where fork is not available: chunks then run here)."""
    _WORK.update(fmt=fmt, tokenizer=tokenizer, max_seq_len=max_seq_len, ignored=ignored)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker encodes on its own core
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=gc.freeze) as pool:
            yield pool
    finally:
        if parallel is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallel


@dataclass
class Built:
    """Everything a build found: bad records, dropped and truncated pairs, records read, and the
    good pairs of each data set (their tokens went to the writer)."""

    problems: list[Problem] = field(default_factory=list)
    report: TokenizeReport = field(default_factory=TokenizeReport)
    records: int = 0
    counts: list[int] = field(default_factory=list)


def build(config: Any, opened: Sequence[Opened], fmt: Any, tokenizer: Any, writer: TokenWriter | None,
          progress: bool = True) -> Built:
    """Read every data set (the first ``max_pairs`` good records of the training set) into
    ``writer``, chunk by chunk; every bad record is collected, none raised."""
    workers = config.data_workers or default_workers()
    built = Built()
    with tqdm(desc="tokenizing" if tokenizer is not None else "reading", unit="record",
              disable=None if progress else True) as bar, frozen_heap():
        for index, data in enumerate(opened):
            limit = config.max_pairs if index == 0 else None
            before = len(built.problems)
            parsed, kept = read_one(data, limit, workers, fmt, tokenizer, config, writer, built, bar)
            if not parsed and len(built.problems) == before:
                built.problems.append(Problem(data.name, "", "the data set holds no preference pairs"))
            built.counts.append(kept)
    return built


def read_one(data: Opened, limit: int | None, workers: int, fmt: Any, tokenizer: Any, config: Any,
             writer: TokenWriter | None, built: Built, bar: Any) -> tuple[int, int]:
    """One data set into ``writer`` and ``built``; returns how many of its records parsed into
    pairs, and how many pairs were kept (not dropped at max_seq_len)."""
    stream = chunks_of(data.records(), CHUNK_RECORDS)
    first = next(stream, None)
    if first is None:
        return 0, 0
    second = next(stream, None)
    todo = [first] + ([second] if second is not None else [])
    parsed = kept = 0
    with worker_pool(workers if second is not None else 1, fmt, tokenizer, config.max_seq_len,
                     config.template_ignores) as pool:
        reads = (chunk for source in (todo, stream) for chunk in source)
        results = pool.imap(work_chunk, reads) if pool is not None else map(work_chunk, reads)
        for chunk in results:
            if limit and parsed + chunk.parsed >= limit:
                chunk = chunk.cut(limit - parsed)
            parsed += chunk.parsed
            kept += len(chunk.pairs)
            add(chunk, writer, built)
            bar.update(chunk.records)
            if limit and parsed >= limit:
                break
    return parsed, kept


def add(chunk: Chunk, writer: TokenWriter | None, built: Built) -> None:
    if writer is not None:
        writer.add(chunk.pairs)
    built.records += chunk.records
    built.problems += [p for _, p in chunk.problems]
    built.report.dropped += [s for _, s in chunk.dropped]
    built.report.truncated += [s for _, s in chunk.truncated]
    for key, count in chunk.ignored.items():
        built.report.ignored[key] = built.report.ignored.get(key, 0) + count
