"""A cache file keyed by its parts, the logic the tokenized-data and reference caches share.

A cache file is named by what it is for (a model or tokenizer and the data sets' paths) and holds
the key parts it was built under beside its tensors. It is read only when every part equals the
run's; otherwise the log says which parts changed, and a truncated, foreign or damaged file is
rebuilt, never misread. Writing is atomic (:func:`preftune.fileio.atomic_torch_save`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def cache_file_for(cache_dir: Path, kind: str, owner: str, datasets: Sequence[str]) -> Path:
    """``cache_dir/kind/<hash>.pt``: the cache of ``owner`` (a model or tokenizer name) on one set
    of data sets."""
    name = json.dumps([owner, [str(Path(d).resolve()) for d in datasets]])
    return cache_dir / kind / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.pt"


def changed_parts(parts: dict[str, str], cached: dict[str, str]) -> list[str]:
    """The key parts that differ between the run and a cache file."""
    return sorted(k for k in parts.keys() | cached.keys() if parts.get(k) != cached.get(k))


def read_fresh(cache_file: Path, parts: dict[str, str], what: str, log: Callable[[str], None],
               interpret: Callable[[dict[str, Any]], T]) -> T | None:
    """``interpret`` of ``cache_file``'s tensors when the file exists, reads, and holds exactly
    ``parts``; None otherwise, and the log says why it will be rebuilt (``what`` names the cache).
    ``interpret`` raises on tables that disagree: the file is then damaged."""
    if not cache_file.exists():
        return None
    try:
        data = torch.load(cache_file, map_location="cpu", weights_only=True)
        cached = json.loads(data.pop("parts")) if isinstance(data, dict) else None
        if not isinstance(cached, dict):
            raise ValueError(f"not a {what} file")
    except Exception as exc:  # a truncated or foreign file: rebuild, say so
        log(f"{what} {cache_file} is unreadable ({type(exc).__name__}: {exc}); rebuilding")
        return None
    changed = changed_parts(parts, cached)
    if changed:
        log(f"{what} {cache_file} is stale ({', '.join(changed)} changed); rebuilding")
        return None
    try:
        return interpret(data)
    except Exception as exc:
        log(f"{what} {cache_file} is damaged ({exc}); rebuilding")
        return None
