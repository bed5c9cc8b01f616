"""Data sets as a test writes them offline: Parquet files, and a Hugging Face hub cache as
``hf download org/name --repo-type dataset`` leaves it (read with ``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SHA = "0123456789abcdef0123456789abcdef01234567"  # the snapshot's commit


def write_parquet(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def hub_cache(home: Path, monkeypatch: Any, rows: list[Any], sha: str = SHA, repo: str = "org/prefs") -> str:
    """``rows`` as the hub dataset ``repo`` in a cache under ``home``, offline; the settings
    ``datasets`` and ``huggingface_hub`` read at import are pointed at it too (``monkeypatch`` is
    pytest's). Returns ``repo``."""
    import datasets.config
    import huggingface_hub.constants

    folder = home / "hub" / ("datasets--" + repo.replace("/", "--"))
    write_parquet(folder / "snapshots" / sha / "data" / "train-00000-of-00001.parquet", rows)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(sha)
    for name, value in (("HF_HOME", home), ("HF_HUB_CACHE", home / "hub"),
                        ("HF_DATASETS_CACHE", home / "datasets")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return repo
