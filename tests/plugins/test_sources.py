"""The built-in data sources: the same records read from JSONL, JSON, Parquet, a Parquet
directory, a save_to_disk directory and a hub cache (offline), in the same order, with their
locations; which source claims a path; identities; strict JSON; splits."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune import Config, ConfigError, Source
from preftune.testing.hubdata import SHA, hub_cache, write_parquet

RECORDS = [{"chosen": {"messages": [{"role": "user", "content": f"Question {i}?"},
                                    {"role": "assistant", "content": f"A kind answer {i}."}]},
            "rejected": {"messages": [{"role": "user", "content": f"Question {i}?"},
                                      {"role": "assistant", "content": f"Go away {i}."}]}}
           for i in range(6)]
PATH_SOURCES = ("jsonl", "json", "parquet", "arrow")


def build(registry: Any, name: str, **settings: Any) -> Any:
    """The source ``name`` as a run with ``settings`` builds it."""
    return registry.build("source", name, Config(base_model="tiny", dataset="unused.jsonl", **settings))


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path



def write_parquet_dir(root: Path, records: list[Any], split: str = "train", shards: int = 3) -> Path:
    """HF's layout: ``data/<split>-0000i-of-0000n.parquet``, the records cut in order."""
    size = -(-len(records) // shards)
    for i in range(shards):
        name = f"{split}-{i:05d}-of-{shards:05d}.parquet"
        write_parquet(root / "data" / name, records[i * size:(i + 1) * size])
    return root


def write_saved(path: Path, records: list[Any]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path



def written(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            records: list[Any]) -> tuple[str, str, list[Source]]:
    """``(source name, spec, locations)`` of ``records`` written as ``kind``."""
    rows = range(len(records))
    if kind == "jsonl":
        spec = str(write_jsonl(tmp_path / "d.jsonl", records))
        return "jsonl", spec, [Source(spec, i + 1) for i in rows]
    if kind == "json":
        spec = str(write_json(tmp_path / "d.json", records))
        return "json", spec, [Source(spec, i, "#") for i in rows]
    if kind == "parquet":
        spec = str(write_parquet(tmp_path / "d.parquet", records))
        return "parquet", spec, [Source(spec, i, "#") for i in rows]
    if kind == "parquet-dir":
        spec = str(write_parquet_dir(tmp_path / "pq", records))
        return "parquet", spec, [Source(f"{spec}/data/train-{i // 2:05d}-of-00003.parquet", i % 2, "#")
                                 for i in rows]
    if kind == "save_to_disk":
        spec = str(write_saved(tmp_path / "saved", records))
        return "arrow", spec, [Source(spec, i, "#") for i in rows]
    repo = hub_cache(tmp_path / "hf", monkeypatch, records)
    return "hf", repo, [Source(f"hf:{repo}@train", i, "#") for i in rows]


KINDS = ("jsonl", "json", "parquet", "parquet-dir", "save_to_disk", "hub")


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_reads_the_same_records_in_order(kind: str, registry: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    name, spec, locations = written(kind, tmp_path, monkeypatch, RECORDS)
    source = build(registry, name)
    source.check(spec, "dataset")
    reads = list(source.records(spec))
    assert [error for _, _, error in reads] == [None] * len(RECORDS)
    assert [record for _, record, _ in reads] == RECORDS
    assert [where for where, _, _ in reads] == locations


@pytest.mark.parametrize("kind", KINDS)
def test_identity_changes_with_one_record_and_only_then(kind: str, registry: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    name, spec, _ = written(kind, tmp_path, monkeypatch, RECORDS)
    before = build(registry, name).identity(spec)
    assert build(registry, name).identity(spec) == before
    assert "unreadable" not in json.dumps(before)
    changed = [*RECORDS[:3], {**RECORDS[3], "rejected": {"messages": []}}, *RECORDS[4:]]
    if kind == "hub":  # a new commit on the hub: a new snapshot that refs/main names
        hub_cache(tmp_path / "hf", monkeypatch, changed, sha="f" * 40)
    else:
        for path in (tmp_path / "saved", tmp_path / "pq"):
            if path.exists():
                shutil.rmtree(path)
        written(kind, tmp_path, monkeypatch, changed)
    after = build(registry, name).identity(spec)
    assert after != before
    assert [r for _, r, _ in build(registry, name).records(spec)] == changed


@pytest.mark.parametrize("kind", ("jsonl", "json", "parquet", "parquet-dir", "save_to_disk"))
def test_exactly_one_path_source_claims_each_path(kind: str, registry: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    name, spec, _ = written(kind, tmp_path, monkeypatch, RECORDS)
    claimed = [other for other in (*PATH_SOURCES, "hf") if build(registry, other).claims(spec)]
    assert claimed == [name]


def test_claims_of_other_paths(registry: Any, tmp_path: Path) -> None:
    """A .json.gz is a JSON list, an unknown suffix is JSONL, a directory of nothing is nobody's."""
    gz = tmp_path / "d.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(RECORDS).encode()))
    other = tmp_path / "d.txt"
    other.write_text("{}\n")
    (tmp_path / "empty").mkdir()
    expect = {str(gz): ["json"], str(other): ["jsonl"], str(tmp_path / "empty"): []}
    for spec, names in expect.items():
        assert [n for n in PATH_SOURCES if build(registry, n).claims(spec)] == names
    assert [r for _, r, _ in build(registry, "json").records(str(gz))] == RECORDS


def test_json_is_as_strict_as_jsonl_record_by_record(registry: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"chosen": 1, "rejected": 2},\n {"chosen": 1, "chosen": 2},\n'
                    ' {"chosen": {"x": NaN}},\n {"chosen": "\\ud800"},\n {"a": [{"b": 1, "b": 2}]}]')
    reads = list(build(registry, "json").records(str(path)))
    assert [str(where) for where, _, _ in reads] == [f"{path}#{i}" for i in range(5)]
    assert reads[0][1] == {"chosen": 1, "rejected": 2}
    errors = [(e.field, e.message) for _, _, e in reads[1:]]
    assert errors[0] == ("chosen", "given twice in one JSON object; which one is meant?")
    assert errors[1] == ("chosen.x", "NaN is not JSON (JSON numbers are finite)")
    assert errors[2][0] == "chosen" and "lone surrogate" in errors[2][1]
    assert errors[3][0] == "a[0].b" and "given twice" in errors[3][1]


@pytest.mark.parametrize("text, where, says", [
    (b'[{"a": 1},\n {"a": 2}\n', 3, "malformed JSON: expected ',' or ']' after a record"),
    (b'[{"a": 1},\n {"a": 2', 2, "malformed JSON: Expecting ',' delimiter at column 9"),
    (b'[{"a": 1},\n {"a": 2}]\n]', 3, "more text after the list's closing ']'"),
    (b'[{"a": 1}, {"a": "\xff"}]', 1, "not valid UTF-8: byte 0xff at byte 19"),
    (b'\xff\xfe[\x00]\x00', 1, "UTF-16"),
])
def test_a_broken_json_file_is_an_error_at_its_line(text: bytes, where: int, says: str, registry: Any,
                                                    tmp_path: Path) -> None:
    """Records are read one at a time: those before the break come through, then the error."""
    path = tmp_path / "d.json"
    path.write_bytes(text)
    *good, (location, record, error) = list(build(registry, "json").records(str(path)))
    assert [r for _, r, _ in good] == [{"a": 1}, {"a": 2}][:len(good)]
    assert (location, record) == (Source(str(path), where), None)
    assert says in error.message


@pytest.mark.parametrize("text, says", [(b'{"chosen": "a"}', "JSON object, not a list"),
                                        (b'  "records"', "JSON value, not a list")])
def test_a_json_file_not_holding_a_list_is_refused_before_reading(text: bytes, says: str, registry: Any,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=f"eval_dataset {path}: holds a {says}"):
        build(registry, "json").check(str(path), "eval_dataset")


def test_a_parquet_directory_is_read_for_the_split(registry: Any, tmp_path: Path) -> None:
    write_parquet_dir(tmp_path, RECORDS[:4], "train", shards=2)
    write_parquet_dir(tmp_path, RECORDS[4:], "test", shards=1)
    for split, expect in (("train", RECORDS[:4]), ("test", RECORDS[4:])):
        source = build(registry, "parquet", dataset_split=split)
        source.check(str(tmp_path), "dataset")
        assert [r for _, r, _ in source.records(str(tmp_path))] == expect
    with pytest.raises(ConfigError, match="dataset_split 'validation': .* holds the splits test, train"):
        build(registry, "parquet", dataset_split="validation").check(str(tmp_path), "dataset")


def test_split_directories_and_one_split_directories(registry: Any, tmp_path: Path) -> None:
    """``train/0000.parquet`` picks by directory; a directory of one split (or none) reads it all."""
    write_parquet(tmp_path / "two" / "train" / "0000.parquet", RECORDS[:3])
    write_parquet(tmp_path / "two" / "test" / "0000.parquet", RECORDS[3:])
    write_parquet(tmp_path / "one" / "test" / "0000.parquet", RECORDS)
    write_parquet(tmp_path / "none" / "a.parquet", RECORDS[:1])
    write_parquet(tmp_path / "none" / "b" / "c.parquet", RECORDS[1:])
    source = build(registry, "parquet")
    for spec, expect in (("two", RECORDS[:3]), ("one", RECORDS), ("none", RECORDS)):
        assert [r for _, r, _ in source.records(str(tmp_path / spec))] == expect


def test_a_column_json_has_no_value_for_is_refused_by_name(registry: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"chosen": ["a"], "meta": [{"blob": b"\x00"}]}), path)
    with pytest.raises(ConfigError, match=r"column 'meta.blob' is binary, which JSON has no value for"):
        build(registry, "parquet").check(str(path), "dataset")


@pytest.mark.parametrize("table, twice", [
    (pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["chosen", "chosen"]), "chosen"),
    (pa.table({"chosen": pa.StructArray.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["m", "m"])}),
     "chosen.m"),
])
def test_a_column_named_twice_is_refused(table: pa.Table, twice: str, registry: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    with pytest.raises(ConfigError, match=f"column '{twice}' is named twice"):
        build(registry, "parquet").check(str(path), "dataset")


def test_a_nan_in_a_parquet_row_is_an_error_at_that_row(registry: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"chosen": ["a", "b"], "score": [[1.0], [float("nan")]]}), path)
    reads = list(build(registry, "parquet").records(str(path)))
    assert reads[0] == (Source(str(path), 0, "#"), {"chosen": "a", "score": [1.0]}, None)
    assert reads[1][:2] == (Source(str(path), 1, "#"), None)
    error = reads[1][2]
    assert (error.field, error.message) == ("score[0]", "is nan: not JSON (JSON numbers are finite)")


def test_a_saved_dataset_dict_is_read_for_the_split(registry: Any, tmp_path: Path) -> None:
    import datasets

    parts = {"train": RECORDS[:4], "test": RECORDS[4:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(
        str(tmp_path / "dd"))
    for split, expect in parts.items():
        source = build(registry, "arrow", dataset_split=split)
        source.check(str(tmp_path / "dd"), "dataset")
        reads = list(source.records(str(tmp_path / "dd")))
        assert [r for _, r, _ in reads] == expect
        assert reads[0][0] == Source(str(tmp_path / "dd" / split), 0, "#")


def test_a_hub_split_in_the_id_overrides_the_setting(registry: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    repo = hub_cache(tmp_path, monkeypatch, RECORDS)
    write_parquet(tmp_path / "hub" / "datasets--org--prefs" / "snapshots" / SHA / "data"
                  / "test-00000-of-00001.parquet", RECORDS[:2])
    source = build(registry, "hf", dataset_split="train")
    reads = list(source.records(f"{repo}@test"))
    assert [(str(w), r) for w, r, _ in reads] == [(f"hf:{repo}@test#{i}", RECORDS[i]) for i in range(2)]
    identity = source.identity(f"{repo}@test")
    assert identity["revision"] == SHA and identity["split"] == "test"
    with pytest.raises(ConfigError, match="dataset_split 'dev': hf:org/prefs holds the splits train, test"):
        build(registry, "hf", dataset_split="dev").check(repo, "dataset")


@pytest.mark.parametrize("spec", ["org/na me", "org/name@", "a/b/c", "/abs"])
def test_a_malformed_hub_id_is_refused(spec: str, registry: Any) -> None:
    with pytest.raises(ConfigError, match=f"dataset hf:{spec}: not a hub data set id"):
        build(registry, "hf").check(spec, "dataset")


def test_sources_register_under_their_names(registry: Any) -> None:
    assert set(registry.names("source")) >= {"jsonl", "json", "parquet", "arrow", "hf"}
