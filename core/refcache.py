"""Reference log-probs: computed once, batched, cached on disk, reused across epochs and runs.

What is stored per pair is what the run's loss needs: the sums of the chosen and rejected
completion log-probs and their token counts (16 bytes a pair), plus per-token rows only for a loss
that declares ``needs_token_logps``.

The cache of a dataset + model lives in one file whose name comes from the model's name and the
dataset paths. Inside, the key parts (model identity, tokenizer, chat template, max_seq_len, a
hash of the tokenized data, whether per-token rows are stored, and the file format's version) are
stored with the numbers; a file whose parts differ from this run's is rebuilt and the changed parts
are named. A file is never read as numbers before its parts match. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import keyed_cache
from .errors import DiskError
from .fileio import atomic_torch_save
from .keyed_cache import read_fresh
from .types import ForwardClient, PairLogps, TokenizedPair, TokenLogps, resolve

FORMAT_VERSION = "2"  # 1: per-token rows of every pair; 2: sums and counts (+ optional rows)
SIDES = ("chosen", "rejected")
IN_FLIGHT = 16  # remote reference batches awaited at once (the cookbook's ref_cache_concurrency)


def default_cache_dir() -> Path:
    """``$PREFTUNE_CACHE_DIR`` or ``~/.cache/preftune``."""
    env = os.environ.get("PREFTUNE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "preftune"


def data_hash(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of the tokenized pairs (tokens and weights, in order)."""
    digest = hashlib.sha256()
    for p in pairs:
        row = (p.prompt, p.chosen, p.rejected, p.chosen_weights, p.rejected_weights)
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()


class ReferenceLogps:
    """Reference numbers of every pair of the run, looked up by dataset index.

    ``sums`` and ``counts`` map ``chosen``/``rejected`` to ``[n]`` float32 tensors; ``rows``,
    when present, maps them to one 1-D tensor of per-token log-probs per pair.
    """

    def __init__(self, sums: dict[str, Tensor], counts: dict[str, Tensor],
                 rows: dict[str, list[Tensor]] | None = None):
        self.sums, self.counts, self.rows = sums, counts, rows

    def __len__(self) -> int:
        return int(self.sums["chosen"].shape[0])

    def select(self, index: Sequence[int]) -> PairLogps:
        """The reference :class:`PairLogps` of the pairs at ``index``, on the CPU."""
        at = torch.tensor(list(index), dtype=torch.long)
        tokens = None
        if self.rows is not None:  # both sides as wide as the longest completion of either,
            # as the backends lay out the policy's rows
            table = padded([self.rows[s][i] for s in SIDES for i in index])
            tokens = TokenLogps(table[: len(at)], table[len(at):])
        return PairLogps(self.sums["chosen"][at], self.sums["rejected"][at],
                         self.counts["chosen"][at], self.counts["rejected"][at], tokens)

    def save(self, path: Path, parts: dict[str, str]) -> None:
        data: dict[str, object] = {"parts": json.dumps(parts, sort_keys=True)}
        for side in SIDES:
            data[f"{side}_sum"], data[f"{side}_count"] = self.sums[side], self.counts[side]
            if self.rows is not None:
                data[f"{side}_rows"] = torch.cat(self.rows[side])
                data[f"{side}_len"] = torch.tensor([len(t) for t in self.rows[side]])
        atomic_torch_save(data, path)

    @staticmethod
    def read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
        """The key parts of a cache file and its raw tensors (numbers not yet interpreted)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        return json.loads(data.pop("parts")), data

    @classmethod
    def from_tensors(cls, data: dict[str, Tensor]) -> ReferenceLogps:
        sums = {s: data[f"{s}_sum"] for s in SIDES}
        counts = {s: data[f"{s}_count"] for s in SIDES}
        rows = None
        if "chosen_rows" in data:
            rows = {s: list(torch.split(data[f"{s}_rows"], data[f"{s}_len"].tolist())) for s in SIDES}
        return cls(sums, counts, rows)

    @classmethod
    def load(cls, path: Path) -> tuple[ReferenceLogps, dict[str, str]]:
        parts, data = cls.read(path)
        return cls.from_tensors(data), parts


def padded(rows: Sequence[Tensor]) -> Tensor:
    """1-D tensors stacked into ``[len(rows), max_len]``, right-padded with 0."""
    out = torch.zeros((len(rows), max((len(r) for r in rows), default=0)), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def blank(n: int, token_logps: bool) -> tuple[dict[str, Tensor], dict[str, Tensor],
                                              dict[str, list[Tensor]] | None]:
    """Sums (NaN until computed), counts and, for per-token losses, rows of ``n`` pairs."""
    sums = {s: torch.full((n,), float("nan")) for s in SIDES}
    counts = {s: torch.zeros(n) for s in SIDES}
    rows = {s: [torch.zeros(0)] * n for s in SIDES} if token_logps else None
    return sums, counts, rows


def compute(client: ForwardClient, pairs: Sequence[TokenizedPair],
            batches: Sequence[Sequence[int]], token_logps: bool = False,
            progress: bool = True, complete: bool = True) -> ReferenceLogps:
    """Reference numbers of every pair, batch by batch (``batches`` cover all pairs, unless not
    ``complete``: one rank's shares). Results that are futures (remote clients) are all
    submitted before the first is awaited."""
    n = len(pairs)
    sums, counts, rows = blank(n, token_logps)
    bar = tqdm(total=sum(len(b) for b in batches), desc="reference log-probs", unit="pair",
               disable=None if progress else True)  # None: only on a terminal

    def store(index: Sequence[int], out: PairLogps) -> None:
        at = torch.tensor(list(index), dtype=torch.long)
        for side in SIDES:
            sums[side][at] = getattr(out, side).detach().float().cpu()
            counts[side][at] = getattr(out, f"{side}_tokens").detach().float().cpu()
            if rows is not None and out.tokens is not None:
                table = getattr(out.tokens, f"{side}_BT").detach().float().cpu()
                for k, i in enumerate(index):
                    rows[side][i] = table[k, : len(getattr(pairs[i], side))].clone()
        bar.update(len(index))

    with bar:  # a remote client's batches overlap, at most IN_FLIGHT at a time
        pending: deque[tuple[Sequence[int], Any]] = deque()
        for index in batches:
            out = client.forward([pairs[i] for i in index], token_logps)
            if callable(getattr(out, "result", None)):
                pending.append((index, out))
            else:
                store(index, out)
            if len(pending) >= IN_FLIGHT:
                store(*_resolved(pending.popleft()))
        while pending:
            store(*_resolved(pending.popleft()))
    if complete:
        check_covered(sums)
    return ReferenceLogps(sums, counts, rows)


def _resolved(item: tuple[Sequence[int], Any]) -> tuple[Sequence[int], PairLogps]:
    return item[0], resolve(item[1])


def load_or_compute(
    cache_file: Path,
    parts: dict[str, str],
    client: ForwardClient,
    pairs: Sequence[TokenizedPair],
    batches: Sequence[Sequence[int]],
    token_logps: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    world: Any = None,
) -> ReferenceLogps:
    """Reuse ``cache_file`` when its key parts equal ``parts``; otherwise compute and save.
    ``client.forward`` is called only on a miss, so a lazy client loads nothing on a hit. Under
    several processes (``world``) every rank computes its share of each batch, the shares are
    gathered, and the main rank writes the file."""
    parts = {**parts, "format_version": FORMAT_VERSION, "per_token": str(token_logps)}
    cached = read_if_fresh(cache_file, parts, len(pairs), log)
    if world is not None and not all(world.gather(cached is not None)):
        cached = None  # every rank computes, or none does
    if cached is not None:
        return cached
    if world is None or world.size == 1:
        reference = compute(client, pairs, batches, token_logps, progress)
    else:
        reference = compute_shared(world, client, pairs, batches, token_logps, progress)

    def save() -> None:
        try:
            reference.save(cache_file, parts)
        except DiskError as exc:  # the cache only saves time: the numbers are here, the run goes on
            log(f"reference log-probs: {exc}; not cached")
            return
        log(f"reference log-probs: cached {len(pairs)} pairs in {cache_file}")

    if world is None:
        save()
    else:
        world.first("writing the reference cache", save)
    return reference


def compute_shared(world: Any, client: ForwardClient, pairs: Sequence[TokenizedPair],
                   batches: Sequence[Sequence[int]], token_logps: bool,
                   progress: bool) -> ReferenceLogps:
    """:func:`compute` with each rank taking its share of every batch; the numbers of all
    pairs, gathered from the ranks that computed them, on every rank."""
    shares = [world.share(batch) for batch in batches]
    with world.collective("computing reference log-probs"):
        mine = compute(client, pairs, [index for index, _ in shares], token_logps,
                       progress and world.is_main, complete=False)
    owned = sorted({i for index, stand_in in shares if not stand_in for i in index})
    at = torch.tensor(owned, dtype=torch.long)
    piece = (at, {s: mine.sums[s][at] for s in SIDES}, {s: mine.counts[s][at] for s in SIDES},
             {s: [mine.rows[s][i] for i in owned] for s in SIDES} if mine.rows is not None else None)
    n = len(pairs)
    sums, counts, rows = blank(n, token_logps)
    for at, part_sums, part_counts, part_rows in world.gather(piece):
        for side in SIDES:
            sums[side][at], counts[side][at] = part_sums[side], part_counts[side]
            if rows is not None and part_rows is not None:
                for i, row in zip(at.tolist(), part_rows[side]):
                    rows[side][i] = row
    check_covered(sums)
    return ReferenceLogps(sums, counts, rows)


def check_covered(sums: dict[str, Tensor]) -> None:
    missing = torch.isnan(sums["chosen"]).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"reference batches do not cover pairs {missing[:10]}")


def read_if_fresh(cache_file: Path, parts: dict[str, str], n: int,
                  log: Callable[[str], None]) -> ReferenceLogps | None:
    """The cached numbers when the file exists, is whole and its key matches; else None (and
    the log says why it will be rebuilt)."""
    def interpret(data: dict[str, Tensor]) -> ReferenceLogps:
        cached = ReferenceLogps.from_tensors(data)
        if len(cached) != n:
            raise ValueError(f"{len(cached)} pairs, expected {n}")
        return cached

    cached = read_fresh(cache_file, parts, "reference cache", log, interpret)
    if cached is not None:
        log(f"reference log-probs: reusing cache {cache_file}")
    return cached


def cache_file_for(cache_dir: Path, model_name: str, datasets: Sequence[str]) -> Path:
    """The cache file of one model on one set of data sets."""
    return keyed_cache.cache_file_for(cache_dir, "reference", model_name, datasets)
