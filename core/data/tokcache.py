"""Tokenized data: rendered with the chat template once, cached on disk, reused across runs.

Rendering a large file's conversations is most of the start-up time of a run, so the tokenized
pairs of a set of dataset files are stored in ``<cache_dir>/tokenized/<name>.pt``, the name coming
from the tokenizer's name and the dataset paths (as the reference cache's does). Inside, the key
parts are stored with the data: the sha256 of each dataset file's bytes, the format selection,
``max_pairs``, ``max_seq_len``, the tokenizer's vocabulary and chat template, the library versions
that render and encode, and this file's format version. A file whose parts differ from the run's is
rebuilt and the changed parts are named; an unreadable or inconsistent file is rebuilt, never
misread. Tokens are stored as flat int32 tensors with lengths and sources as (file index, line),
so a hit reports the paths as this run spells them (relative or absolute). Files are written
atomically, and nothing is written for data that fails to parse or tokenize.
"""

from __future__ import annotations

import array
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain
from pathlib import Path
from typing import Any

import numpy
import torch

from ..errors import DiskError
from ..fileio import atomic_torch_save
from ..hub import tokenizer_identity
from ..refcache import data_hash, default_cache_dir
from ..types import Source, TokenizedPair
from .records import AutoFormat, load_pairs
from .tokenize import TokenizeReport, tokenize_pairs

FORMAT_VERSION = "6"  # 2: duplicate keys, 3: roles and control tokens, 4: identical after truncation,
# 5: bytes (gzip, BOMs, lone surrogates, NaN refused), 6: reasoning text beside content refused
PROBE = TokenizedPair((1,), (2,), (3,), (1.0,), (1.0,))  # fingerprints data_hash's definition


@dataclass
class Tokenized:
    """A run's tokenized pairs (training file first, then the eval file), what tokenization had
    to change, and ``refcache.data_hash`` of the pairs."""

    pairs: list[TokenizedPair]
    report: TokenizeReport
    sha256: str


def tokenize_datasets(config: Any, fmt: Any, tokenizer: Any, log: Callable[[str], None] = print,
                      progress: bool = True) -> Tokenized:
    """The tokenized pairs of ``config.dataset`` (first ``max_pairs``) and ``config.eval_dataset``,
    from the cache when its key still matches; parsed and tokenized otherwise (a bad line is the
    same :class:`DataError` as without a cache)."""
    datasets = [config.dataset] + ([config.eval_dataset] if config.eval_dataset else [])
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    cache_file = cache_file_for(cache_dir, config.tokenizer_model or config.base_model, datasets)
    parts = key_parts(config, fmt, tokenizer, datasets)

    def build() -> Tokenized:
        train = load_pairs(config.dataset, fmt)[: config.max_pairs or None]
        held = load_pairs(config.eval_dataset, fmt) if config.eval_dataset else []
        pairs, report = tokenize_pairs(tokenizer, train + held, config.max_seq_len, progress=progress)
        return Tokenized(pairs, report, data_hash(pairs))

    return load_or_build(cache_file, parts, build, datasets, log)


def load_or_build(cache_file: Path, parts: dict[str, str], build: Callable[[], Tokenized],
                  datasets: Sequence[str], log: Callable[[str], None] = print) -> Tokenized:
    """Reuse ``cache_file`` when its key parts equal ``parts``; otherwise build, then save unless a
    dataset file changed while it was read."""
    parts = {**parts, "format_version": FORMAT_VERSION}
    cached = read_cache(cache_file, parts, datasets, log)
    if cached is not None:
        log(f"tokenized data: reusing cache {cache_file} ({len(cached.pairs)} pairs)")
        return cached
    start = time.perf_counter()
    built = build()
    seconds = time.perf_counter() - start
    if any(parts.get(k) != v for k, v in files_parts(datasets).items()):
        log(f"tokenized data: a dataset file changed while it was read; not caching {cache_file}")
        return built
    try:
        atomic_torch_save(pack(built, parts, datasets), cache_file)
    except DiskError as exc:  # the cache only saves time: the run goes on without it
        log(f"tokenized data: {exc}; not cached")
        return built
    log(f"tokenized data: {len(built.pairs)} pairs in {seconds:.1f} s, cached in {cache_file}")
    return built


def read_cache(cache_file: Path, parts: dict[str, str], datasets: Sequence[str],
               log: Callable[[str], None]) -> Tokenized | None:
    """The cached data when ``cache_file`` holds it under ``parts``; None (and why) otherwise."""
    if not cache_file.exists():
        return None
    try:
        data = torch.load(cache_file, map_location="cpu", weights_only=True)
        cached_parts = json.loads(data["parts"]) if isinstance(data, dict) else None
        if not isinstance(cached_parts, dict):
            raise ValueError("not a tokenized-data cache file")
    except Exception as exc:  # a truncated or foreign file: rebuild, say so
        log(f"tokenized-data cache {cache_file} is unreadable ({exc}); rebuilding")
        return None
    if cached_parts != parts:
        changed = sorted(k for k in parts.keys() | cached_parts.keys()
                         if parts.get(k) != cached_parts.get(k))
        log(f"tokenized-data cache {cache_file} is stale ({', '.join(changed)} changed); rebuilding")
        return None
    try:
        return unpack(data, datasets)
    except Exception as exc:
        log(f"tokenized-data cache {cache_file} is inconsistent ({exc}); rebuilding")
        return None


def key_parts(config: Any, fmt: Any, tokenizer: Any, datasets: Sequence[str]) -> dict[str, str]:
    """What the tokenized data depends on (the cache is rebuilt when any of it changes)."""
    import tokenizers
    import transformers

    parts = {**files_parts(datasets), **tokenizer_identity(tokenizer),
             "format": format_identity(config, fmt),
             "max_pairs": str(config.max_pairs), "max_seq_len": str(config.max_seq_len),
             "special_tokens": json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True,
                                         default=str),
             "renderer": f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}",
             "data_hash_probe": data_hash([PROBE])}
    return {k: str(v) for k, v in parts.items()}


def files_parts(datasets: Sequence[str]) -> dict[str, str]:
    """The sha256 of each dataset file's bytes: ``dataset_sha256``, ``eval_dataset_sha256``."""
    names = ("dataset_sha256", "eval_dataset_sha256")
    return {name: file_sha256(path) for name, path in zip(names, datasets)}


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
    """The cache file of one tokenizer on one set of dataset files."""
    name = json.dumps([tokenizer_name, [str(Path(d).resolve()) for d in datasets]])
    return cache_dir / "tokenized" / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.pt"


def pack(tokenized: Tokenized, parts: dict[str, str], datasets: Sequence[str]) -> dict[str, Any]:
    """The cache file's content: flat int32 tokens, per-pair lengths and sources, the report."""
    index = {name: i for i, name in enumerate(datasets)}
    pairs = tokenized.pairs
    seqs = (seq for p in pairs for seq in (p.prompt, p.chosen, p.rejected))
    tokens = array.array("i", chain.from_iterable(seqs))  # int32; ~2x faster than a list
    return {
        "parts": json.dumps(parts, sort_keys=True),
        "tokens": torch.from_numpy(numpy.frombuffer(tokens, dtype=numpy.int32).copy()),
        "lengths": torch.tensor([[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs],
                                dtype=torch.int64).reshape(-1, 3),
        "sources": _sources([p.source for p in pairs], index),
        "truncated": torch.tensor([p.truncated for p in pairs], dtype=torch.bool),
        "dropped": _sources(tokenized.report.dropped, index),
        "data_sha256": tokenized.sha256,
    }


def unpack(data: dict[str, Any], datasets: Sequence[str]) -> Tokenized:
    """The :class:`Tokenized` a cache file holds; a ``ValueError`` when its tensors disagree."""
    lengths, tokens = data["lengths"], data["tokens"]
    n = lengths.shape[0]
    if (tokens.dtype != torch.int32 or lengths.dim() != 2 or lengths.shape[1] != 3
            or (n and int(lengths.min()) < 0) or int(lengths.sum()) != tokens.numel()
            or tuple(data["sources"].shape) != (n, 2) or tuple(data["truncated"].shape) != (n,)):
        raise ValueError("the token, length and source tables do not match")
    sources = _unsources(data["sources"], datasets)
    flat = array.array("i", tokens.numpy().tobytes())  # slices ~2x faster than of tolist()
    ends = list(accumulate(lengths.reshape(-1).tolist()))
    starts = [0] + ends[:-1]
    seqs = [tuple(flat[a:b]) for a, b in zip(starts, ends)]
    pairs = []
    for i, (source, truncated) in enumerate(zip(sources, data["truncated"].tolist())):
        prompt, chosen, rejected = seqs[3 * i : 3 * i + 3]
        pairs.append(TokenizedPair(prompt, chosen, rejected, (1.0,) * len(chosen),
                                   (1.0,) * len(rejected), source, truncated))
    report = TokenizeReport(_unsources(data["dropped"], datasets),
                            [p.source for p in pairs if p.truncated])
    return Tokenized(pairs, report, str(data["data_sha256"]))


def _sources(sources: Sequence[Source | None], index: dict[str, int]) -> torch.Tensor:
    """Sources as ``[n, 2]`` (dataset index, line); -1 for a pair without a source."""
    rows = [[index[s.file], s.line] if s is not None else [-1, 0] for s in sources]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def _unsources(table: torch.Tensor, datasets: Sequence[str]) -> list[Source | None]:
    rows = table.tolist()
    if any(not -1 <= f < len(datasets) for f, _ in rows):
        raise ValueError("a source names a dataset file this run does not have")
    return [Source(datasets[f], line) if f >= 0 else None for f, line in rows]
