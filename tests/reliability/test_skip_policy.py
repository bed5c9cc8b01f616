"""on_bad_record: stop on a bad record (the default), or skip it, listed in skipped.jsonl, unless
the bad share is above max_bad_fraction."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from preftune import ConfigError, DataError, run


def data_with_bad(tmp_path: Path, pair_record: Any, n: int = 60, bad: tuple[int, ...] = (5, 17)) -> Path:
    """``n`` good lines with bad ones at the 1-based lines ``bad`` (a broken line, a control token)."""
    lines = []
    for i in range(1, n + 1):
        word = ["great", "awful", "fine", "bad"][i % 4]
        record = pair_record(f"Tell me about {word} {i}.", f"Sure, {word} is fine.", f"No, {word}.")
        if i == bad[0]:
            lines.append('{"chosen": {"messages": [}')
            continue
        if len(bad) > 1 and i in bad[1:]:
            record["chosen"]["messages"][-1]["content"] = "Sure<|im_end|><|im_start|>user\nhi"
        lines.append(json.dumps(record))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_skip_trains_without_the_bad_records_and_lists_each(
    make_config: Any, tmp_path: Path, pair_record: Any
) -> None:
    data = data_with_bad(tmp_path, pair_record)
    config = make_config(dataset=str(data), on_bad_record="skip", max_bad_fraction=0.05)
    summary = run(config)
    assert summary["status"] == "completed" and summary["skipped_records"] == 2
    rows = [json.loads(line) for line in (Path(config.log_path) / "skipped.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{data}:5", f"{data}:17"]
    assert "malformed JSON" in rows[0]["reason"] and rows[0]["record"] is None  # no record to show
    assert rows[1]["field"] == "chosen" and "control token '<|im_end|>'" in rows[1]["reason"]
    assert "Sure<|im_end|>" in rows[1]["record"]  # the record as read, for the user to mend
    run_start = json.loads((Path(config.log_path) / "summary.json").read_text())
    assert run_start["skipped_records"] == 2


def test_a_warm_cache_skips_and_lists_the_same_records(
    make_config: Any, tmp_path: Path, pair_record: Any
) -> None:
    data = data_with_bad(tmp_path, pair_record)
    skip = {"dataset": str(data), "on_bad_record": "skip", "max_bad_fraction": 0.05}
    first = make_config(log_path=str(tmp_path / "a"), **skip)
    second = make_config(log_path=str(tmp_path / "b"), epochs=2, **skip)
    run(first)
    assert run(second)["skipped_records"] == 2
    assert (tmp_path / "a" / "skipped.jsonl").read_text() == (tmp_path / "b" / "skipped.jsonl").read_text()


def test_the_default_stops_before_training_and_says_how_to_skip(
    make_config: Any, tmp_path: Path, pair_record: Any
) -> None:
    config = make_config(dataset=str(data_with_bad(tmp_path, pair_record)))
    with pytest.raises(DataError, match=r"2 bad record\(s\) of 60(.|\n)*on_bad_record = \"skip\""):
        run(config)
    assert not (Path(config.log_path) / "final").exists()


def test_more_bad_records_than_max_bad_fraction_stop_the_run(
    make_config: Any, tmp_path: Path, pair_record: Any
) -> None:
    data = data_with_bad(tmp_path, pair_record, n=40, bad=(3, 9, 10, 11))
    config = make_config(dataset=str(data), on_bad_record="skip", max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"10\.0% of the records, above max_bad_fraction = 0\.05"):
        run(config)
    logs = Path(config.log_path)
    assert not (logs / "final").exists() and not (logs / "skipped.jsonl").exists()


def test_a_long_bad_record_is_cut_in_skipped_jsonl(make_config: Any, tmp_path: Path,
                                                    pair_record: Any, write_jsonl: Any) -> None:
    from preftune.data.policy import RAW_LIMIT

    records = [pair_record(f"q {i} great", f"Yes {i}.", f"No {i}.") for i in range(60)]
    records[7]["chosen"]["messages"][-1]["content"] = "x" * 10_000 + "<|im_end|>"
    config = make_config(dataset=str(write_jsonl(tmp_path / "d.jsonl", records)), on_bad_record="skip",
                         max_bad_fraction=0.05)
    run(config)
    [row] = [json.loads(line) for line in (Path(config.log_path) / "skipped.jsonl").read_text().splitlines()]
    assert len(row["record"]) == RAW_LIMIT + 3 and row["record"].endswith("...")


def test_a_fifo_as_dataset_is_refused_at_once(make_config: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    config = make_config(dataset=str(fifo))
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: outcome.append(pytest.raises(ConfigError, run, config).value))
    worker.daemon = True  # reading a FIFO without a writer blocks forever: never wait on that
    worker.start()
    worker.join(timeout=60)
    assert outcome, "the run blocked on the FIFO"
    assert "is a FIFO (named pipe), not a file or directory" in str(outcome[0])
    assert not Path(config.log_path).exists()  # refused before anything was made
