"""Tokenized data: rendered with the chat template once, cached on disk, reused across runs.

Rendering a large data set's conversations is most of the start-up time of a run, so the tokens
of a run's data sets are stored under ``<cache_dir>/tokenized/``: one int32 token file, memory-
mapped by the runs that read it, named by the digest of its content, and beside it ``<name>.pt``,
the index (lengths, locations, a digest per pair, the report, the bad records) with the key parts
it was built under: what each data set is (as its source says), the format selection,
``max_pairs``, ``max_seq_len``, ``template_ignores``, the tokenizer's vocabulary and chat template,
the library versions that render and encode, and this file's format version (see
:mod:`preftune.keyed_cache`). Locations are stored as (origin index, line or row), so a hit reports
the paths as this run spells them. A build with bad records is cached only when the run skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch

from .. import keyed_cache
from ..errors import DiskError, Problem
from ..fileio import atomic_torch_save, follow_umask, locked_temp, writing
from ..hub import tokenizer_identity
from ..keyed_cache import read_fresh
from ..refcache import default_cache_dir
from ..types import Source, TokenizedPair
from .build import build
from .policy import Raw, raw_text
from .records import AutoFormat
from .sources import Opened
from .table import DIGEST, PairTable, TokenWriter, map_tokens
from .tokenize import TokenizeReport

FORMAT_VERSION = "7"  # 2: duplicate keys, 3: roles and control tokens, 4: identical after truncation,
# 5: bytes (gzip, BOMs, lone surrogates, NaN refused), 6: reasoning text beside content refused,
# 7: sources, TRL formats, tools, the end of turn, bad records kept
PROBE = TokenizedPair((1,), (2,), (3,), (1.0,), (1.0,))  # fingerprints the data hash's definition


@dataclass
class Tokenized:
    """A run's tokenized pairs (the training set's first, then the eval set's) as a
    :class:`PairTable`, what tokenization had to change, the sha256 of the pairs, the bad records,
    how many records were read, and how many of the pairs are the training set's."""

    pairs: PairTable
    report: TokenizeReport
    sha256: str
    problems: list[Problem] = field(default_factory=list)
    records: int = 0
    train_count: int = 0


def build_tokenized(config: Any, opened: Sequence[Opened], fmt: Any, tokenizer: Any,
                    progress: bool = True, tokens_file: Path | None = None) -> Tokenized:
    """Read, parse, check and tokenize the data sets (the first ``max_pairs`` of the training
    set) into ``tokens_file``; every bad record is collected, none raised. Without a tokenizer
    (``validate`` without one) records are parsed and checked only."""
    if tokenizer is None or tokens_file is None:
        built = build(config, opened, fmt, tokenizer, None, progress)
        return Tokenized(PairTable.of([]), built.report, "", built.problems, built.records,
                         built.counts[0])
    writer = TokenWriter(tokens_file)
    try:
        built = build(config, opened, fmt, tokenizer, writer, progress)
    finally:
        writer.close()
    table = writer.table()
    return Tokenized(table, built.report, table.sha256(), built.problems, built.records, built.counts[0])


def tokenize_datasets(config: Any, opened: Sequence[Opened], fmt: Any, tokenizer: Any,
                      log: Callable[[str], None] = print, progress: bool = True) -> Tokenized:
    """The tokenized pairs of the run's data sets, from the cache when its key still matches;
    read and tokenized otherwise. Bad records are returned (the policy decides), and a build
    with bad records is cached only when the run skips them."""
    names = [data.name for data in opened]
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    cache_file = cache_file_for(cache_dir, config.tokenizer_model or config.base_model, names)
    parts = key_parts(config, fmt, tokenizer, opened)

    def make(tokens_file: Path) -> Tokenized:
        return build_tokenized(config, opened, fmt, tokenizer, progress, tokens_file)

    def keep(built: Tokenized) -> bool:
        return not built.problems or config.on_bad_record == "skip"

    return load_or_build(cache_file, parts, make, names, log, lambda: identity_parts(opened), keep)


def tokens_path(cache_file: Path, sha256: str) -> Path:
    """The token file a cache file names: content-addressed, so a run that still maps an older
    one is never handed other tokens under its name."""
    return cache_file.with_name(f"{cache_file.stem}.{sha256[:16]}.i32")


def load_or_build(cache_file: Path, parts: dict[str, str], make: Callable[[Path], Tokenized],
                  datasets: Sequence[str], log: Callable[[str], None] = print,
                  identity: Callable[[], dict[str, str]] | None = None,
                  keep: Callable[[Tokenized], bool] = lambda built: True) -> Tokenized:
    """Reuse ``cache_file`` when its key parts equal ``parts``; otherwise build (``make`` writes
    the tokens to the file it is given), then save unless a data set changed while it was read
    (``identity`` differs from its part of the key) or ``keep`` refuses the build."""
    parts = {**parts, "format_version": FORMAT_VERSION}
    cached = read_cache(cache_file, parts, datasets, log)
    if cached is not None:
        log(f"tokenized data: reusing cache {cache_file} ({len(cached.pairs)} pairs)")
        return cached
    start = time.perf_counter()
    try:
        with writing(cache_file):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp, lock = locked_temp(cache_file.parent, f".{cache_file.stem}.", ".i32.tmp")
    except DiskError as exc:  # the cache only saves time: build beside it, keep nothing
        log(f"tokenized data: {exc}; not cached")
        return uncached(make)
    try:  # the lock keeps another run's clean-up off the file while it is written
        built = make(Path(tmp))
        seconds = time.perf_counter() - start
        if identity is not None and any(parts.get(k) != v for k, v in identity().items()):
            log(f"tokenized data: a data set changed while it was read; not caching {cache_file}")
            return built
        if not keep(built):
            return built  # its tokens stay mapped from the temporary file, unlinked below
        final = tokens_path(cache_file, built.sha256)
        with writing(final):
            follow_umask(tmp)
            os.replace(tmp, final)
        atomic_torch_save(pack(built, parts, datasets, final), cache_file)
    except DiskError as exc:  # the cache only saves time: the run goes on without it
        log(f"tokenized data: {exc}; not cached")
        return built
    finally:  # unlinked while mapped: the pages stay readable and the disk space goes with the run
        Path(tmp).unlink(missing_ok=True)
        os.close(lock)
    for stale in cache_file.parent.glob(f"{cache_file.stem}.*.i32"):
        if stale != final:  # a run that maps it keeps its pages (the file lives on unlinked)
            stale.unlink(missing_ok=True)
    log(f"tokenized data: {len(built.pairs)} pairs in {seconds:.1f} s, cached in {cache_file}")
    return built


def uncached(make: Callable[[Path], Tokenized]) -> Tokenized:
    """A build whose tokens go to a temporary file, memory-mapped and unlinked at once (a
    million pairs' tokens never need to fit in memory)."""
    fd, tmp = tempfile.mkstemp(suffix=".i32")
    os.close(fd)
    try:
        return make(Path(tmp))
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_cache(cache_file: Path, parts: dict[str, str], datasets: Sequence[str],
               log: Callable[[str], None]) -> Tokenized | None:
    """The cached data when ``cache_file`` holds it under ``parts``; None (and why) otherwise."""
    return read_fresh(cache_file, parts, "tokenized-data cache", log,
                      lambda data: unpack(data, datasets, cache_file))


def key_parts(config: Any, fmt: Any, tokenizer: Any, opened: Sequence[Opened]) -> dict[str, str]:
    """What the tokenized data depends on (the cache is rebuilt when any of it changes)."""
    import tokenizers
    import transformers

    parts = {**identity_parts(opened), **tokenizer_identity(tokenizer),
             "format": format_identity(config, fmt),
             "max_pairs": str(config.max_pairs), "max_seq_len": str(config.max_seq_len),
             "template_ignores": str(config.template_ignores),
             "special_tokens": json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True,
                                         default=str),
             "renderer": f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}",
             "data_hash_probe": PairTable.of([PROBE]).sha256()}
    return {k: str(v) for k, v in parts.items()}


def identity_parts(opened: Sequence[Opened]) -> dict[str, str]:
    """What each data set is, as its source says (content hashes, a fingerprint and revision):
    ``dataset``, ``eval_dataset``, with the source's name."""
    return {data.key: json.dumps({"source": type(data.source).__name__, **data.identity()},
                                 sort_keys=True) for data in opened}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content; a file that cannot be read hashes as its error (the parser
    reports it)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return digest.hexdigest()


def format_identity(config: Any, fmt: Any) -> str:
    """The format selection: the name (every registered name for ``auto``) and their options."""
    names = sorted(fmt.formats) if isinstance(fmt, AutoFormat) else [config.format]
    tables = config.plugin_tables() if hasattr(config, "plugin_tables") else {}
    return json.dumps({"format": config.format, "formats": names,
                       "options": {n: tables[n] for n in names if n in tables}},
                      sort_keys=True, default=str)


def cache_file_for(cache_dir: Path, tokenizer_name: str, datasets: Sequence[str]) -> Path:
    """The cache file of one tokenizer on one set of data sets."""
    return keyed_cache.cache_file_for(cache_dir, "tokenized", tokenizer_name, datasets)


def pack(tokenized: Tokenized, parts: dict[str, str], datasets: Sequence[str],
         tokens_file: Path) -> dict[str, Any]:
    """The cache file's content: flat int32 tokens, per-pair lengths and sources, the report, the
    bad records. Sources are (origin index, line or row) into a table of origins, where an
    origin that is one of the run's data set names is stored as its index (a hit then reports
    it as this run spells it)."""
    table = tokenized.pairs
    origins = Origins(datasets)
    problems = [{"where": origins.row(p.where) if isinstance(p.where, Source) else str(p.where),
                 "field": p.field, "reason": p.reason, "record": raw_text(p.record)}
                for p in tokenized.problems]
    return {
        "parts": json.dumps(parts, sort_keys=True),
        "lengths": torch.from_numpy(table.lengths.copy()),
        "digests": torch.from_numpy(numpy.array(table.digests, dtype=numpy.uint8)),
        "sources": origins.table(list(table.sources)),
        "truncated": torch.from_numpy(numpy.array(table.truncated, dtype=bool)),
        "dropped": origins.table(tokenized.report.dropped),
        "data_sha256": tokenized.sha256,
        "meta": json.dumps({"origins": origins.saved(), "problems": problems, "tokens": tokens_file.name,
                            "ignored": tokenized.report.ignored,
                            "records": tokenized.records, "train_count": tokenized.train_count}),
    }


def unpack(data: dict[str, Any], datasets: Sequence[str], cache_file: Path) -> Tokenized:
    """The :class:`Tokenized` a cache file holds, its tokens memory-mapped; a ``ValueError`` when
    its tables disagree with each other or with the token file."""
    lengths, digests = data["lengths"].numpy(), data["digests"].numpy()
    meta = json.loads(data["meta"])
    origins = Origins.load(meta["origins"], datasets)
    n = lengths.shape[0]
    if (lengths.ndim != 2 or lengths.shape[1] != 3 or (n and int(lengths.min()) < 0)
            or tuple(digests.shape) != (n, DIGEST) or tuple(data["sources"].shape) != (n, 2)
            or tuple(data["truncated"].shape) != (n,) or not 0 <= meta["train_count"] <= n
            or "/" in meta["tokens"]):
        raise ValueError("the length, digest and source tables do not match")
    tokens = map_tokens(cache_file.with_name(meta["tokens"]), int(lengths.sum()))
    table = PairTable(tokens, lengths, origins.sources(data["sources"]), data["truncated"].numpy(),
                      digests)
    if table.sha256() != str(data["data_sha256"]):
        raise ValueError("the pair digests do not give the data's sha256")
    report = TokenizeReport(origins.sources(data["dropped"]),
                            [s for s, t in zip(table.sources, table.truncated) if t],
                            {str(k): int(v) for k, v in meta["ignored"].items()})
    problems = [Problem(origins.source(p["where"]) if isinstance(p["where"], list) else p["where"],
                        p["field"], p["reason"], Raw(p["record"]) if p["record"] is not None else None)
                for p in meta["problems"]]
    return Tokenized(table, report, str(data["data_sha256"]), problems, int(meta["records"]),
                     int(meta["train_count"]))


class Origins:
    """The files (or hub splits) sources name, as a table: a source is stored as (index, line)."""

    def __init__(self, datasets: Sequence[str], saved: Sequence[tuple[str | int, str]] = ()):
        self.datasets = list(datasets)
        self.entries: list[tuple[str, str]] = []
        self.index: dict[tuple[str, str], int] = {}
        for name, sep in saved:
            if isinstance(name, int) and not 0 <= name < len(self.datasets):
                raise ValueError("a source names a data set this run does not have")
            self._add((self.datasets[name] if isinstance(name, int) else name, sep))

    @classmethod
    def load(cls, saved: Sequence[Any], datasets: Sequence[str]) -> Origins:
        return cls(datasets, [(name, sep) for name, sep in saved])

    def _add(self, key: tuple[str, str]) -> int:
        if key not in self.index:
            self.index[key] = len(self.entries)
            self.entries.append(key)
        return self.index[key]

    def row(self, source: Source) -> list[int]:
        return [self._add((source.file, source.sep)), source.line]

    def table(self, sources: Sequence[Source | None]) -> torch.Tensor:
        """Sources as ``[n, 2]`` (origin index, line); -1 for a pair without a source."""
        rows = [self.row(s) if s is not None else [-1, 0] for s in sources]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)

    def saved(self) -> list[tuple[str | int, str]]:
        position = {name: i for i, name in enumerate(self.datasets)}
        return [(position.get(name, name), sep) for name, sep in self.entries]

    def source(self, row: Sequence[int]) -> Source | None:
        origin, line = row
        if not -1 <= origin < len(self.entries):
            raise ValueError("a source names an origin the cache does not have")
        return Source(self.entries[origin][0], line, self.entries[origin][1]) if origin >= 0 else None

    def sources(self, table: torch.Tensor) -> list[Source | None]:
        return [self.source(row) for row in table.tolist()]
