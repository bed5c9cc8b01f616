"""Columnar sources: Parquet files and directories of shards, and ``datasets.save_to_disk`` dirs.

Rows stream one record batch at a time (never a whole table as Python objects) and are located
``file#row``: the shard (or the saved split's directory) and the 0-based row within it. What can
be checked without reading the rows is checked in ``check``: every shard's footer and column
types, a missing ``-NNNNN-of-MMMMM`` shard, the split to read, each ``.arrow`` file of a saved
data set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from preftune import ConfigError, RecordError, Source
from preftune.data import file_sha256
from preftune.types import Read

from .sources_arrow import BATCH_ROWS, has_floats, non_json_column, rows

SHARD = re.compile(r"^(?P<split>.+?)-(?P<index>\d{5})-of-(?P<count>\d{5})(?:-[^.]*)?\.parquet$", re.I)
SPLIT_WORDS = frozenset({"train", "test", "validation", "valid", "val", "dev", "eval", "evaluation"})
SAVED_MARKERS = ("state.json", "dataset_dict.json")


def is_parquet_file(spec: str) -> bool:
    """A regular file named ``*.parquet`` (any case)."""
    return spec.lower().endswith(".parquet") and Path(spec).is_file()


def is_saved_dataset(spec: str) -> bool:
    """A directory ``datasets.save_to_disk`` wrote (a Dataset or a DatasetDict)."""
    return any((Path(spec) / marker).is_file() for marker in SAVED_MARKERS)


def parquet_files(root: Path) -> list[Path]:
    """Every ``*.parquet`` file under ``root`` (hidden directories skipped), relative, sorted."""
    found = (path.relative_to(root) for path in root.rglob("*") if path.suffix.lower() == ".parquet")
    return sorted(rel for rel in found if not any(part.startswith(".") for part in rel.parts)
                  and (root / rel).is_file())


def split_of(rel: Path, wanted: str) -> str | None:
    """The split a shard belongs to: the prefix of an ``x-NNNNN-of-MMMMM`` name, else a split
    word (or ``wanted``) as a directory or as the file name's first word; None when none."""
    shard = SHARD.match(rel.name)
    if shard:
        return shard["split"]
    known = SPLIT_WORDS | {wanted}
    directory = next((part for part in reversed(rel.parts[:-1]) if part in known), None)
    first_word = re.split(r"[-_.]", rel.name, maxsplit=1)[0]
    return directory or (first_word if first_word in known else None)


def pick_split(spec: str, files: list[Path], wanted: str) -> list[Path]:
    """The shards to read: all of a directory holding one split (or none named), else those of
    ``wanted``; a split that is not there is an error naming the ones that are."""
    labels = {rel: split_of(rel, wanted) for rel in files}
    named = sorted({label for label in labels.values() if label})
    unnamed = [rel for rel, label in labels.items() if label is None]
    if named and unnamed:
        raise ConfigError(f"dataset {spec}: {unnamed[0]} belongs to no split while other shards do "
                          f"({', '.join(named)}); move it out or name it after its split")
    if len(named) <= 1:
        return files
    if wanted not in named:
        raise ConfigError(f"dataset_split {wanted!r}: {spec} holds the splits {', '.join(named)}; "
                          "set dataset_split to one of them")
    return [rel for rel in files if labels[rel] == wanted]


def missing_shards(files: list[Path]) -> list[str]:
    """Shards of an ``x-NNNNN-of-MMMMM`` series that are not there (by index)."""
    series: dict[tuple[Path, str, int], set[int]] = {}
    for rel in files:
        shard = SHARD.match(rel.name)
        if shard:
            key = (rel.parent, shard["split"], int(shard["count"]))
            series.setdefault(key, set()).add(int(shard["index"]))
    return [str(parent / f"{split}-{index:05d}-of-{count:05d}.parquet")
            for (parent, split, count), present in sorted(series.items())
            for index in range(count) if index not in present]


class ParquetSource:
    """A ``.parquet`` file or a directory of Parquet shards (HF's ``data/train-00000-of-00003``
    and ``train/0000`` layouts), read for ``dataset_split`` when it holds several splits."""

    def __init__(self, split: str = "train"):
        self.split = split

    def claims(self, spec: str) -> bool:
        path = Path(spec)
        if path.is_dir():
            return not is_saved_dataset(spec) and bool(parquet_files(path))
        return is_parquet_file(spec)

    def shards(self, spec: str, key: str = "dataset") -> list[Path]:
        """The shard paths to read, in order; refused when the series is incomplete."""
        root = Path(spec)
        if not root.is_dir():
            if not root.is_file():
                raise ConfigError(f"{key} {spec}: no such file or directory")
            return [root]
        files = parquet_files(root)
        if not files:
            raise ConfigError(f"{key} {spec}: the directory holds no .parquet files")
        missing = missing_shards(files)
        if missing:
            raise ConfigError(f"{key} {spec}: shard {missing[0]} is missing ({len(missing)} of the "
                              "series in all); download the data set again")
        return [root / rel for rel in pick_split(spec, files, self.split)]

    def check(self, spec: str, key: str) -> None:
        for shard in self.shards(spec, key):
            try:
                schema = pq.ParquetFile(shard).schema_arrow
            except (OSError, pa.ArrowException) as exc:
                raise ConfigError(f"{key} {spec}: {shard} is not a readable Parquet file ({exc})") from None
            problem = non_json_column(schema)
            if problem:
                raise ConfigError(f"{key} {spec}: {shard}: {problem}")

    def identity(self, spec: str) -> dict[str, str]:
        root = Path(spec)
        base = root if root.is_dir() else root.parent
        return {f"parquet:{shard.relative_to(base)}": file_sha256(shard) for shard in self.shards(spec)}

    def records(self, spec: str) -> Iterator[Read]:
        for shard in self.shards(spec):
            yield from shard_records(shard)


def shard_records(shard: Path) -> Iterator[Read]:
    """The rows of one Parquet file, a row group at a time: a damaged file is an error at the
    first row of the row group that could not be read."""
    row = 0
    try:
        parquet = pq.ParquetFile(shard)
        problem = non_json_column(parquet.schema_arrow)
        if problem:
            yield Source(str(shard), 0, "#"), None, RecordError("", problem)
            return
        floats = has_floats(parquet.schema_arrow)
        for group in range(parquet.num_row_groups):
            batches = parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group])
            for record, error in rows(batches, floats):
                yield Source(str(shard), row, "#"), record, error
                row += 1
    except (OSError, pa.ArrowException) as exc:
        yield Source(str(shard), row, "#"), None, RecordError(
            "", f"cannot read the Parquet file from row {row} on ({exc}); is it damaged or cut short?")


class ArrowDirSource:
    """A ``datasets.save_to_disk`` directory: a Dataset (``state.json``, ``data-*.arrow``) or a
    DatasetDict (``dataset_dict.json``, a directory per split, ``dataset_split`` picks one)."""

    def __init__(self, split: str = "train"):
        self.split = split

    def claims(self, spec: str) -> bool:
        return Path(spec).is_dir() and is_saved_dataset(spec)

    def split_dir(self, spec: str, key: str = "dataset") -> Path:
        """The Dataset directory to read: ``spec``, or its ``dataset_split`` directory."""
        root = Path(spec)
        listing = root / "dataset_dict.json"
        if not listing.is_file():
            return root
        splits = read_json(listing, key, spec).get("splits", [])
        if self.split not in splits:
            raise ConfigError(f"dataset_split {self.split!r}: {spec} holds the splits "
                              f"{', '.join(map(str, splits))}; set dataset_split to one of them")
        return root / self.split

    def arrow_files(self, spec: str, key: str = "dataset") -> list[Path]:
        """The ``.arrow`` files ``state.json`` names, in order."""
        directory = self.split_dir(spec, key)
        state = read_json(directory / "state.json", key, spec)
        try:
            return [directory / entry["filename"] for entry in state["_data_files"]]
        except (KeyError, TypeError):
            raise ConfigError(f"{key} {spec}: {directory / 'state.json'} names no _data_files; "
                              "save the data set again with save_to_disk") from None

    def check(self, spec: str, key: str) -> None:
        for path in self.arrow_files(spec, key):
            try:
                with pa.memory_map(str(path)) as mapped:  # zero-copy: reads the layout, not the data
                    schema = pa.ipc.open_stream(mapped).read_all().schema
            except (OSError, pa.ArrowException) as exc:
                raise ConfigError(f"{key} {spec}: {path} (named in state.json) is missing or damaged "
                                  f"({exc}); save the data set again with save_to_disk") from None
            problem = non_json_column(schema)
            if problem:
                raise ConfigError(f"{key} {spec}: {problem}")

    def identity(self, spec: str) -> dict[str, str]:
        directory = self.split_dir(spec)
        files = [directory / "state.json", *self.arrow_files(spec)]
        return {f"arrow:{path.relative_to(spec)}": file_sha256(path) for path in files}

    def records(self, spec: str) -> Iterator[Read]:
        import datasets  # imported when used: a JSONL run does not pay for it

        directory = self.split_dir(spec)
        try:
            dataset = datasets.load_from_disk(str(directory))  # memory-mapped
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise ConfigError(f"dataset {spec}: cannot load it with load_from_disk ({exc})") from None
        yield from dataset_records(dataset, str(directory))


def dataset_records(dataset: object, name: str) -> Iterator[Read]:
    """The rows of a ``datasets.Dataset`` as JSON records, ``name#row``, a batch at a time."""
    schema = dataset.data.schema  # type: ignore[attr-defined]
    problem = non_json_column(schema)
    if problem:
        yield Source(name, 0, "#"), None, RecordError("", problem)
        return
    batches = dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)  # type: ignore[attr-defined]
    for row, (record, error) in enumerate(rows(batches, has_floats(schema))):
        yield Source(name, row, "#"), record, error


def read_json(path: Path, key: str, spec: str) -> dict:
    """A JSON object file of a saved data set, or a ConfigError naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key} {spec}: cannot read {path} ({exc}); is this a directory "
                          "save_to_disk wrote?") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key} {spec}: {path} does not hold a JSON object")
    return value
