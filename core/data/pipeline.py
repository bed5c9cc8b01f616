"""The one data path that ``run`` and ``validate`` both walk: the data sets' sources, then
records, pairs, tokens (from the cache when its key holds), then the bad-record policy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from . import policy
from .sources import Opened, open_object, open_source
from .tokcache import Tokenized, build_tokenized, tokenize_datasets


def open_datasets(registry: Any, config: Any, objects: dict[str, Any] | None = None) -> list[Opened]:
    """The run's data sets (``dataset``, then ``eval_dataset``), each with the source that reads
    it, checked before anything loads. ``objects`` holds data sets handed over from Python
    (``run(config, dataset=ds)``), which take the place of the settings."""
    objects = {k: v for k, v in (objects or {}).items() if v is not None}
    opened = []
    for key in ("dataset", "eval_dataset"):
        if key in objects:
            opened.append(open_object(key, objects[key]))
        elif getattr(config, key):
            opened.append(open_source(registry, config, key, getattr(config, key)))
        elif key == "dataset":
            raise ConfigError("dataset: required: a JSONL, JSON or Parquet file, a directory, "
                              "hf:org/name, or from Python run(config, dataset=...)")
    if len(opened) == 2:
        if same_data(opened[0], opened[1]):
            raise ConfigError("eval_dataset is the training dataset; held-out pairs must be other pairs")
    return opened


def same_data(a: Opened, b: Opened) -> bool:
    """Whether two settings name the same data (one path spelled two ways, or one hub split)."""
    if type(a.source) is not type(b.source):
        return False
    paths = [Path(o.spec).resolve() if Path(o.spec).exists() else o.spec for o in (a, b)]
    return paths[0] == paths[1]


def prepare(registry: Any, config: Any, fmt: Any, tokenizer: Any, log: Callable[[str], None],
            log_path: Path | None = None, progress: bool = True,
            opened: list[Opened] | None = None) -> Tokenized:
    """Read, check and tokenize the run's data sets (``tokenizer`` None: read and check only),
    then apply ``on_bad_record``: a :class:`DataError` listing the bad records, or the good
    pairs with the bad ones written to ``log_path/skipped.jsonl``."""
    opened = opened if opened is not None else open_datasets(registry, config)
    if tokenizer is None:
        tokenized = build_tokenized(config, opened, fmt, None, progress)
    else:
        tokenized = tokenize_datasets(config, opened, fmt, tokenizer, log, progress)
    whole = [p for p in tokenized.problems if not hasattr(p.where, "sep")]  # a set with no pair
    if whole:
        raise DataError(whole, total=tokenized.records)
    policy.apply(config, tokenized.problems, tokenized.records, log_path, log)
    return tokenized
