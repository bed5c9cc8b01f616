"""The tensorboard sink, read back from its event files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from preftune import run

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def events(directory: Path) -> list[Any]:
    """Every event of the TFRecord files under ``directory`` (length, crc, data, crc)."""
    found = []
    for file in sorted(directory.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12 : at + 12 + length])
            found.append(event)
            at += 12 + length + 4
    return found


def scalars(directory: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for event in events(directory):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_scalars_per_step_and_evaluation_and_the_masked_config(make_config: Any) -> None:
    config = make_config(epochs=1, eval_interval=2, sinks=["jsonl", "tensorboard"])
    run(config)
    logs = Path(config.log_path)
    seen = scalars(logs / "tensorboard")
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert seen["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in rows}, rel=1e-6)
    evals = [json.loads(line) for line in (logs / "eval.jsonl").read_text().splitlines()]
    assert seen["eval/eval_accuracy"] == pytest.approx({e["step"]: e["eval_accuracy"] for e in evals})
    texts = [v.tensor.string_val[0].decode() for e in events(logs / "tensorboard")
             for v in e.summary.value if v.tag.startswith("config")]
    assert texts and '"base_model": "builtin:tiny"' in texts[0]
