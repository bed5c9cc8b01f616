"""Reference log-probs: computed once, batched, cached on disk, reused across epochs and runs.

The cache of a dataset + model lives in one file whose name comes from the model's name and the
dataset paths. Inside, the key parts (model identity, tokenizer, chat template, max_seq_len and a
hash of the tokenized data) are stored with the log-probs; a file whose parts differ from this
run's is rebuilt and the changed parts are named. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .fileio import atomic_torch_save
from .types import Batch, ForwardClient, PairLogps, TokenizedPair, collate

FORMAT_VERSION = "1"


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
    """Per-token reference log-probs of every pair of the run, looked up by dataset index."""

    def __init__(self, chosen: list[Tensor], rejected: list[Tensor]):
        self.chosen = chosen
        self.rejected = rejected

    def for_batch(self, batch: Batch) -> PairLogps:
        """The rows of ``batch`` padded to its width, on its device."""
        width = batch.input_ids.shape[1]
        out = torch.zeros((2 * batch.size, width), dtype=torch.float32)
        for row, i in enumerate(batch.index):
            c, r = self.chosen[i], self.rejected[i]
            out[row, : len(c)] = c
            out[batch.size + row, : len(r)] = r
        return PairLogps.from_rows(out.to(batch.input_ids.device))

    def save(self, path: Path, parts: dict[str, str]) -> None:
        data = {
            "parts": json.dumps(parts, sort_keys=True),
            "chosen": torch.cat(self.chosen),
            "rejected": torch.cat(self.rejected),
            "chosen_len": torch.tensor([len(t) for t in self.chosen]),
            "rejected_len": torch.tensor([len(t) for t in self.rejected]),
        }
        atomic_torch_save(data, path)

    @classmethod
    def load(cls, path: Path) -> tuple[ReferenceLogps, dict[str, str]]:
        data = torch.load(path, map_location="cpu", weights_only=True)
        chosen = list(torch.split(data["chosen"], data["chosen_len"].tolist()))
        rejected = list(torch.split(data["rejected"], data["rejected_len"].tolist()))
        return cls(chosen, rejected), json.loads(data["parts"])


def compute(
    client: ForwardClient,
    pairs: Sequence[TokenizedPair],
    batches: Sequence[Sequence[int]],
    pad_id: int,
    progress: bool = True,
) -> ReferenceLogps:
    """Reference log-probs of every pair, computed batch by batch (``batches`` cover all pairs)."""
    chosen: list[Tensor | None] = [None] * len(pairs)
    rejected: list[Tensor | None] = [None] * len(pairs)
    bar = tqdm(total=len(pairs), desc="reference log-probs", unit="pair", disable=not progress)
    with bar:
        for index in batches:
            batch = collate([pairs[i] for i in index], list(index), pad_id)
            logps = client.forward(batch)
            rows = torch.cat([logps.chosen, logps.rejected]).float().cpu()
            for row, i in enumerate(index):
                chosen[i] = rows[row, : batch.lengths[row]].clone()
                rejected[i] = rows[batch.size + row, : batch.lengths[batch.size + row]].clone()
            bar.update(len(index))
    missing = [i for i, c in enumerate(chosen) if c is None]
    if missing:
        raise ValueError(f"reference batches do not cover pairs {missing[:10]}")
    return ReferenceLogps(chosen, rejected)  # type: ignore[arg-type]


def load_or_compute(
    cache_file: Path,
    parts: dict[str, str],
    make_client: Callable[[], ForwardClient],
    pairs: Sequence[TokenizedPair],
    batches: Sequence[Sequence[int]],
    pad_id: int,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> ReferenceLogps:
    """Reuse ``cache_file`` when its key parts equal ``parts``; otherwise compute and save."""
    parts = {**parts, "format_version": FORMAT_VERSION}
    if cache_file.exists():
        try:
            cached, cached_parts = ReferenceLogps.load(cache_file)
        except Exception as exc:  # a truncated or foreign file: rebuild, say so
            log(f"reference cache {cache_file} is unreadable ({exc}); rebuilding")
        else:
            if cached_parts == parts:
                log(f"reference log-probs: reusing cache {cache_file}")
                return cached
            changed = sorted(k for k in parts.keys() | cached_parts.keys()
                             if parts.get(k) != cached_parts.get(k))
            log(f"reference cache {cache_file} is stale ({', '.join(changed)} changed); rebuilding")
    reference = compute(make_client(), pairs, batches, pad_id, progress)
    reference.save(cache_file, parts)
    log(f"reference log-probs: cached {len(pairs)} pairs in {cache_file}")
    return reference


def cache_file_for(cache_dir: Path, model_name: str, datasets: Sequence[str]) -> Path:
    """The cache file of one model on one set of dataset files."""
    name = json.dumps([model_name, [str(Path(d).resolve()) for d in datasets]])
    return cache_dir / "reference" / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.pt"
