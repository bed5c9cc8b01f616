"""Hub data sets, ``hf:org/name`` or ``hf:org/name@split``, read through ``datasets`` from the
local cache, honouring ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` as they are when the run reads.

Offline, ``datasets.load_dataset("org/name")`` only finds a data set ``datasets`` prepared before
(under ``HF_DATASETS_CACHE``); a snapshot ``hf download org/name --repo-type dataset`` put in the
hub cache is read from its directory instead (its README configs and data files as on the hub).
Records are located ``hf:org/name@split#row``. The identity is the data set's fingerprint, the
revision (the snapshot's commit) and the config and split.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from preftune import ConfigError
from preftune.types import Read

from .sources_columnar import dataset_records

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
TRUE = {"1", "ON", "YES", "TRUE"}


def offline_now() -> bool:
    """The live offline setting: ``HF_DATASETS_OFFLINE`` when set, else ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``), as ``datasets`` reads them, but now rather than at its import."""
    flag = os.environ.get("HF_DATASETS_OFFLINE")
    if flag is None:
        flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in TRUE


@contextmanager
def offline_mode(offline: bool) -> Iterator[None]:
    """Make ``datasets`` and ``huggingface_hub`` (which read the setting at import) use ``offline``."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved


def cached_snapshot(repo: str) -> Path | None:
    """The hub cache's snapshot of the data set's main revision, or None when it has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def holds_data(snapshot: Path) -> bool:
    """Whether a snapshot holds data files: loading a data set online fetches its README into the
    hub cache, and its data may come from the Parquet export, another revision."""
    return any(path.is_file() and path.name != "README.md" and not path.name.startswith(".")
               for path in snapshot.rglob("*"))


def cached_revision(repo: str) -> str | None:
    """The commit the hub cache's ``refs/main`` names for the data set, or None."""
    import huggingface_hub.constants as hub
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(hub.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="dataset") / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def load_failure(key: str, repo: str, exc: Exception, offline: bool, config: str | None) -> str:
    """What a failed ``load_dataset`` means for the user, and what to do."""
    from datasets.exceptions import DatasetNotFoundError

    where = f"{key} hf:{repo}"
    if isinstance(exc, ConnectionError) and offline:
        return (f"{where}: not in the local cache, and HF_HUB_OFFLINE is set; fetch it with "
                f"`hf download {repo} --repo-type dataset`, then run again (or unset HF_HUB_OFFLINE)")
    if isinstance(exc, ConnectionError):
        return (f"{where}: cannot reach the Hugging Face Hub ({exc}); check the network, or fetch it "
                f"elsewhere (`hf download {repo} --repo-type dataset`) and run with HF_HUB_OFFLINE=1")
    if isinstance(exc, DatasetNotFoundError):
        return (f"{where}: no such data set on the Hub, or it is private or gated ({exc}); check the id, "
                "and for a private or gated one log in (`hf auth login`) or set HF_TOKEN")
    named = f" with dataset_config {config!r}" if config else ""
    return f"{where}: cannot load it{named} ({type(exc).__name__}: {exc})"


def prepared_revision(dataset: Any) -> str:
    """Where ``datasets`` prepared a data set read without a hub snapshot: its cache directory's
    name holds the commit it was prepared from."""
    files = dataset.cache_files
    return "cache:" + Path(files[0]["filename"]).parent.name if files else "in-memory"


class HubSource:
    """A hub data set id, read for ``dataset_split`` (or the id's ``@split``) and
    ``dataset_config``; only read when named (``hf:org/name``), never claimed."""

    def __init__(self, split: str = "train", config: str | None = None):
        self.split = split
        self.config = config
        self.loaded: dict[str, tuple[Any, str, str]] = {}  # spec -> (dataset, split, revision)

    def claims(self, spec: str) -> bool:
        return False

    def parse(self, spec: str, key: str) -> tuple[str, str]:
        """The repo id and split of ``org/name[@split]``."""
        repo, _, split = spec.partition("@")
        if not HUB_ID.match(repo) or (spec.count("@") and not split):
            raise ConfigError(f"{key} hf:{spec}: not a hub data set id; write hf:org/name or "
                              "hf:org/name@split")
        return repo, split or self.split

    def load(self, spec: str, key: str = "dataset") -> tuple[Any, str, str]:
        """The split's ``datasets.Dataset``, the split and the revision (loaded once per spec)."""
        if spec not in self.loaded:
            self.loaded[spec] = self.open(spec, key)
        return self.loaded[spec]

    def open(self, spec: str, key: str) -> tuple[Any, str, str]:
        repo, split = self.parse(spec, key)
        offline = offline_now()
        with offline_mode(offline):
            splits, revision = self.load_splits(repo, key, offline)
            revision = revision or cached_revision(repo)
        if split not in splits:
            setting = key if "@" in spec else "dataset_split"
            raise ConfigError(f"{setting} {split!r}: hf:{repo} holds the splits {', '.join(splits)}; "
                              "name one of them")
        return splits[split], split, revision or prepared_revision(splits[split])

    def load_splits(self, repo: str, key: str, offline: bool) -> tuple[Any, str | None]:
        """All splits of the data set, and the snapshot's commit when read from one. Offline, a
        snapshot holding data files is read first; then what ``datasets`` prepared before."""
        import datasets

        snapshot = cached_snapshot(repo) if offline else None
        if snapshot is not None and holds_data(snapshot):
            try:
                return datasets.load_dataset(str(snapshot), name=self.config), snapshot.name
            except Exception:  # noqa: BLE001 - an incomplete snapshot: try the prepared cache
                pass
        try:
            return datasets.load_dataset(repo, name=self.config), None
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each is said, none a traceback
            raise ConfigError(load_failure(key, repo, exc, offline, self.config)) from None

    def check(self, spec: str, key: str) -> None:
        self.load(spec, key)

    def identity(self, spec: str) -> dict[str, str]:
        dataset, split, revision = self.load(spec)
        return {"hf": spec.partition("@")[0], "split": split, "config": self.config or "",
                "revision": revision, "fingerprint": dataset._fingerprint}

    def records(self, spec: str) -> Iterator[Read]:
        dataset, split, _ = self.load(spec)
        yield from dataset_records(dataset, f"hf:{spec.partition('@')[0]}@{split}")
