"""The plain-format example plugin, installed: auto-detected, validated, and trainable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from preftune_plain_format import PlainFormat

from preftune import Config, DataError, RecordError, get_registry, run


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plain_is_registered_from_its_distribution() -> None:
    component = get_registry().get("format", "plain")
    assert (component.distribution, component.plugin) == ("preftune-plain-format", "plain")


def test_plain_parses_to_the_same_pair_as_the_cookbook_formats() -> None:
    registry = get_registry()
    config = Config(base_model="builtin:tiny", dataset="x")
    io = registry.build("format", "input_output", config)
    plain = {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."}
    f2 = {"input": "Name a fruit.", "preferred_output": "An apple.", "non_preferred_output": "A chair."}
    assert PlainFormat().parse(plain) == io.parse(f2)
    with pytest.raises(RecordError) as info:
        PlainFormat().parse({"prompt": "x", "chosen": 3, "rejected": "y"})
    assert info.value.field == "chosen"


def test_auto_picks_plain_and_a_run_trains(tmp_path: Path) -> None:
    words = ["red", "blue", "green", "gold", "pink", "gray"]
    records = [{"prompt": f"Say yes to {w} {i}.", "chosen": f"Yes, {w}.", "rejected": f"Never {w}."}
               for i, w in enumerate(words * 4)]
    data = write(tmp_path / "plain.jsonl", records)
    config = Config(base_model="builtin:tiny", dataset=str(data), format="auto", eval_fraction=0.25,
                    epochs=4, batch_size=4, learning_rate=3e-3, max_seq_len=64,
                    log_path=str(tmp_path / "logs"), cache_dir=str(tmp_path / "cache"), sinks=["jsonl"])
    summary = run(config)
    assert summary["final_eval"]["eval_margin"] > summary["initial_eval"]["eval_margin"]
    bad = write(tmp_path / "bad.jsonl", [records[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run(config.model_copy(update={"dataset": str(bad), "format": "plain"}))
