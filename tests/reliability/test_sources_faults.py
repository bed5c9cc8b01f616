"""Faults in data sources (issue 21): wrong column types, a missing shard, damaged Parquet and
Arrow files, a hub id not cached offline or unreachable online, a split that is not there. Each
is a ConfigError naming the setting and what to do, or an error at the row, never a traceback;
and random records round-trip through the Parquet and JSON sources unchanged."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune import ConfigError, Source

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("source_fixtures", HERE.parent / "plugins" / "test_sources.py")
fixtures = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
sys.modules["source_fixtures"] = fixtures
spec.loader.exec_module(fixtures)  # type: ignore[union-attr]
RECORDS, SHA, build, hub_cache = fixtures.RECORDS, fixtures.SHA, fixtures.build, fixtures.hub_cache
write_parquet, write_parquet_dir = fixtures.write_parquet, fixtures.write_parquet_dir
write_json = fixtures.write_json

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_a_column_of_the_wrong_type_comes_through_as_it_is(registry: Any, tmp_path: Path) -> None:
    """``chosen`` an int64 column: the source reads it faithfully; the format refuses it later."""
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"chosen": pa.array([1, 2], pa.int64()), "rejected": ["a", "b"]}), path)
    source = build(registry, "parquet")
    source.check(str(path), "dataset")
    assert list(source.records(str(path))) == [
        (Source(str(path), 0, "#"), {"chosen": 1, "rejected": "a"}, None),
        (Source(str(path), 1, "#"), {"chosen": 2, "rejected": "b"}, None)]


def test_a_directory_with_a_missing_shard_is_refused_naming_it(registry: Any, tmp_path: Path) -> None:
    write_parquet_dir(tmp_path, RECORDS, shards=3)
    (tmp_path / "data" / "train-00001-of-00003.parquet").unlink()
    source = build(registry, "parquet")
    for call in (lambda: source.check(str(tmp_path), "eval_dataset"), lambda: source.identity(str(tmp_path)),
                 lambda: list(source.records(str(tmp_path)))):
        with pytest.raises(ConfigError, match=r"shard data/train-00001-of-00003.parquet is missing"):
            call()


@pytest.mark.parametrize("damage", ["truncated", "not parquet", "empty"])
def test_a_damaged_parquet_file_is_refused_naming_it(damage: str, registry: Any, tmp_path: Path) -> None:
    write_parquet_dir(tmp_path, RECORDS, shards=2)
    shard = tmp_path / "data" / "train-00001-of-00002.parquet"
    content = {"truncated": shard.read_bytes()[:-20], "not parquet": b'{"chosen": "a"}\n', "empty": b""}
    shard.write_bytes(content[damage])
    with pytest.raises(ConfigError, match=f"dataset {tmp_path}: {shard} is not a readable Parquet file"):
        build(registry, "parquet").check(str(tmp_path), "dataset")
    reads = list(build(registry, "parquet").records(str(tmp_path)))
    assert [r for _, r, _ in reads[:3]] == RECORDS[:3]
    assert reads[3][:2] == (Source(str(shard), 0, "#"), None)
    assert "cannot read the Parquet file from row 0 on" in reads[3][2].message


def test_a_damaged_page_past_a_good_footer_is_an_error_at_its_row(registry: Any, tmp_path: Path) -> None:
    """The footer reads (check passes); the third row group's page header does not."""
    path = tmp_path / "d.parquet"
    rows = [{"chosen": f"chosen text {i} " * 20, "rejected": f"rejected {i}"} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    offset = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    source = build(registry, "parquet")
    source.check(str(path), "dataset")
    reads = list(source.records(str(path)))
    assert [r for _, r, _ in reads[:20]] == rows[:20]
    assert len(reads) == 21 and reads[20][:2] == (Source(str(path), 20, "#"), None)
    assert "cannot read the Parquet file from row 20 on" in reads[20][2].message


@pytest.mark.parametrize("cached", ["nothing", "only its README"])
def test_a_hub_id_not_cached_offline_says_how_to_fetch_it(cached: str, registry: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in the cache, or only its README (what an online load whose data came from the hub's
    Parquet export leaves under refs/main)."""
    hub_cache(tmp_path, monkeypatch, RECORDS)  # holds org/prefs, not org/other
    if cached != "nothing":
        folder = tmp_path / "hub" / "datasets--org--other"
        (folder / "snapshots" / SHA).mkdir(parents=True)
        (folder / "snapshots" / SHA / "README.md").write_text("---\nlicense: mit\n---\n")
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(SHA)
    with pytest.raises(ConfigError) as caught:
        build(registry, "hf").check("org/other", "eval_dataset")
    assert str(caught.value) == (
        "eval_dataset hf:org/other: not in the local cache, and HF_HUB_OFFLINE is set; fetch it with "
        "`hf download org/other --repo-type dataset`, then run again (or unset HF_HUB_OFFLINE)")


def test_offline_is_read_when_the_source_reads(registry: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_DATASETS_OFFLINE=1 set after ``datasets`` was imported (with HF_HUB_OFFLINE unset) is
    honoured: no request is made, the error says offline; the libraries' own flags are restored."""
    import datasets.config
    import huggingface_hub.constants

    hub_cache(tmp_path, monkeypatch, RECORDS)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="hf:org/other: not in the local cache"):
        build(registry, "hf").check("org/other", "dataset")
    assert [r for _, r, _ in build(registry, "hf").records("org/prefs")] == RECORDS
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("exc, offline, says", [
    (ConnectionError("Couldn't reach 'org/x' on the Hub (ConnectError)"), False,
     "dataset hf:org/x: cannot reach the Hugging Face Hub "
     "(Couldn't reach 'org/x' on the Hub (ConnectError)); "
     "check the network, or fetch it elsewhere (`hf download org/x --repo-type dataset`) and run with "
     "HF_HUB_OFFLINE=1"),
    ("not found", False, "dataset hf:org/x: no such data set on the Hub, or it is private or gated "
     "(Dataset 'org/x' doesn't exist on the Hub or cannot be accessed.); check the id, and for a private or "
     "gated one log in (`hf auth login`) or set HF_TOKEN"),
    (ValueError("BuilderConfig 'zz' not found. Available: ['default']"), False,
     "dataset hf:org/x: cannot load it with dataset_config 'zz' (ValueError: BuilderConfig 'zz' not found. "
     "Available: ['default'])"),
])
def test_what_a_failed_hub_load_means_is_said(exc: Any, offline: bool, says: str) -> None:
    """The online failures, as ``datasets`` raises them (a real unreachable endpoint costs ~23 s of
    huggingface_hub's retries, too slow for the suite: measured once, same message)."""
    from datasets.exceptions import DatasetNotFoundError

    from preftune.plugins.sources_hub import load_failure

    if exc == "not found":
        exc = DatasetNotFoundError("Dataset 'org/x' doesn't exist on the Hub or cannot be accessed.")
    assert load_failure("dataset", "org/x", exc, offline, "zz" if "zz" in says else None) == says


def test_a_dataset_dict_without_the_split_names_those_it_has(registry: Any, tmp_path: Path) -> None:
    import datasets

    splits = {"train": datasets.Dataset.from_list(RECORDS[:3]),
              "test": datasets.Dataset.from_list(RECORDS[3:])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"dataset_split 'validation': .*dd holds the splits train, test"):
        build(registry, "arrow", dataset_split="validation").check(str(tmp_path / "dd"), "dataset")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_arrow_file_is_refused_naming_it(damage: str, registry: Any, tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    arrow = tmp_path / "saved" / state["_data_files"][0]["filename"]
    if damage == "missing":
        arrow.unlink()
    else:
        arrow.write_bytes(arrow.read_bytes()[:200])
    with pytest.raises(ConfigError, match=f"dataset {tmp_path / 'saved'}: {arrow} \\(named in state.json\\) "
                                          "is missing or damaged"):
        build(registry, "arrow").check(str(tmp_path / "saved"), "dataset")


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)  # Arrow strings are UTF-8
MESSAGES = st.lists(st.fixed_dictionaries({"role": TEXT, "content": TEXT}), max_size=3)
ROW = st.fixed_dictionaries({
    "chosen": st.fixed_dictionaries({"messages": MESSAGES}),
    "rejected": st.fixed_dictionaries({"messages": MESSAGES}),
    "score": st.none() | st.floats(allow_nan=False, allow_infinity=False),
    "rank": st.none() | st.integers(-2**63, 2**63 - 1),
    "ok": st.booleans(),
    "tags": st.lists(TEXT, max_size=3),
})
SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT
JSON_VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(TEXT, inner, max_size=3), max_leaves=10)


@BOUNDED
@given(rows=st.lists(ROW, min_size=1, max_size=5))
def test_random_records_round_trip_through_parquet_and_json(rows: list[dict[str, Any]], registry: Any,
                                                            tmp_path: Path) -> None:
    for name, write, path in (("parquet", write_parquet, tmp_path / "r.parquet"),
                              ("json", write_json, tmp_path / "r.json")):
        write(path, rows)
        reads = list(build(registry, name).records(str(path)))
        assert reads == [(Source(str(path), i, "#"), row, None) for i, row in enumerate(rows)]


@BOUNDED
@given(records=st.lists(st.dictionaries(TEXT, JSON_VALUE, max_size=4), max_size=4))
def test_any_json_records_round_trip_through_the_json_source(records: list[dict[str, Any]], registry: Any,
                                                             tmp_path: Path) -> None:
    path = write_json(tmp_path / "r.json", records)
    assert [r for _, r, _ in build(registry, "json").records(str(path))] == records
