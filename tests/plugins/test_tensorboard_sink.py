"""The tensorboard sink, read back from its event files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from preftune import get_plugin_manager, hookimpl, run

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


# ---- resume: what TensorBoard itself shows -------------------------------------------------------

class StopAt6:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        class Stop:
            @hookimpl
            def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
                if step == 6:
                    raise KeyboardInterrupt

        register("stop", lambda config, options: Stop())


def shown(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Each scalar tag's (step, value) points as TensorBoard's own reader gives them, after it
    purges what a restart (purge_step) or steps that go back drop."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    reader = accumulator.EventAccumulator(str(directory), size_guidance={accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def assert_shows_the_logs(directory: Path, logs: Path) -> None:
    """Every train/<key> and eval/<key> series is the jsonl files' rows, step for step: no step
    twice, none missing, no value of the interrupted run where the resumed one logged its own."""
    seen = shown(directory)
    for prefix, file in (("train", "metrics.jsonl"), ("eval", "eval.jsonl")):
        rows = [json.loads(line) for line in (logs / file).read_text().splitlines()]
        for key in (k for k, v in rows[-1].items() if k != "step" and isinstance(v, float)):
            expected = [(r["step"], r[key]) for r in rows]
            got = seen[f"{prefix}/{key}"]
            assert [s for s, _ in got] == [s for s, _ in expected], f"{prefix}/{key}"
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key


@pytest.mark.parametrize("same_second", [False, True], ids=["later", "within-one-second"])
def test_a_resumed_run_shows_each_step_once_with_the_resumed_runs_values(
        make_config: Any, monkeypatch: pytest.MonkeyPatch, same_second: bool) -> None:
    """Stopped at step 6 after the checkpoint at 4, then resumed: TensorBoard shows steps 1-10
    once each, 5 and 6 as the resumed run logged them (its elapsed_s differs), as metrics.jsonl.
    Within one second, tensorboardX names both sessions' files alike: the second must not
    overwrite the first."""
    if same_second:
        from tensorboardX import event_file_writer

        monkeypatch.setattr(event_file_writer, "time", SimpleNamespace(time=lambda: 1_800_000_000.5))
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(StopAt6())
    config = make_config(epochs=2, checkpoint_interval=4, eval_interval=3,
                         sinks=["jsonl", "tensorboard", "stop"])
    with pytest.raises(KeyboardInterrupt):
        run(config, pm)
    run(config.model_copy(update={"resume": True, "sinks": ["jsonl", "tensorboard"]}))
    logs = Path(config.log_path)
    assert len((logs / "metrics.jsonl").read_text().splitlines()) == 10
    assert_shows_the_logs(logs / "tensorboard", logs)


def test_a_new_run_in_a_used_log_path_hides_the_old_runs_scalars(make_config: Any) -> None:
    """A run that does not resume, in a log_path an earlier run used: TensorBoard shows only
    the new run's steps (its metrics.jsonl), not the old run's beyond them."""
    config = make_config(epochs=2, eval_interval=3, sinks=["jsonl", "tensorboard"])
    run(config)
    run(config.model_copy(update={"epochs": 1}))
    logs = Path(config.log_path)
    assert len((logs / "metrics.jsonl").read_text().splitlines()) == 5
    assert_shows_the_logs(logs / "tensorboard", logs)


def test_eval_samples_are_a_markdown_table_per_evaluation(make_config: Any) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    config = make_config(sinks=["jsonl", "tensorboard"], eval_samples=2, eval_sample_tokens=4)
    run(config)
    reader = accumulator.EventAccumulator(str(Path(config.log_path) / "tensorboard"),
                                          size_guidance={accumulator.TENSORS: 0})
    reader.Reload()
    events = reader.Tensors("eval/samples/text_summary")
    samples = [json.loads(line)
               for line in (Path(config.log_path) / "samples.jsonl").read_text().splitlines()]
    assert [e.step for e in events] == sorted({r["step"] for r in samples}) == [0, 5]
    for event in events:
        table = event.tensor_proto.string_val[0].decode().splitlines()
        assert table[:2] == ["| source | prompt | completion | chosen |", "|---|---|---|---|"]
        rows = [r for r in samples if r["step"] == event.step]
        assert table[2:] == ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", "<br>")
                                               for c in ("source", "prompt", "completion", "chosen")) + " |"
                             for r in rows]
