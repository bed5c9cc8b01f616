"""The W&B sink, run for real in offline mode; the test reads back the offline run file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from preftune import get_plugin_manager, hookimpl, run

wandb = pytest.importorskip("wandb")


def items(updates: Any) -> dict[str, Any]:
    return {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in updates}


def read_records(path: Path) -> list[Any]:
    """Records of a W&B ``.wandb`` file: a header, then LevelDB-style log blocks of chunks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            out.append(wandb_internal_pb2.Record.FromString(buf))
            buf = b""
    return out


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wandb.teardown()  # no W&B service or run state carried over from another test
    for key, sub in (("WANDB_CACHE_DIR", "c"), ("WANDB_DATA_DIR", "d"), ("WANDB_CONFIG_DIR", "cfg")):
        monkeypatch.setenv(key, str(tmp_path / "wandb-env" / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield tmp_path
    wandb.teardown()


class SecretOptionsPlugin:
    """A plugin with a secret option, to check it never reaches W&B."""

    @hookimpl
    def register_sinks(self, register: Any) -> None:
        from pydantic import BaseModel, SecretStr

        class Options(BaseModel):
            api_key: SecretStr

        class Quiet:
            pass

        register("remote", lambda config, options: Quiet(), Options)


def test_offline_run_logs_steps_eval_config_and_summary(make_config: Any, wandb_env: Path) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(SecretOptionsPlugin())
    config = make_config(sinks=["jsonl", "wandb", "remote"], epochs=2, eval_interval=5,
                         wandb={"project": "pt-test", "tags": ["ci"], "run_name": "r1"},
                         remote={"api_key": "fw-SECRET-KEY-123"})
    summary = run(config, pm)
    wandb.teardown()  # stop W&B's service process, which flushes the offline run file
    [run_file] = list(Path(config.log_path).glob("wandb/offline-run-*/run-*.wandb"))
    records = read_records(run_file)
    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history.append(items(record.history.item))
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in steps] == list(range(1, summary["steps"] + 1))
    assert {"margin", "accuracy", "grad_norm", "lr", "tokens_per_s"} <= set(steps[0])
    assert [h["step"] for h in evals] == [0, 5, 10]
    blob = run_file.read_bytes()
    assert b"fw-SECRET-KEY-123" not in blob and b"**********" in blob
    run_info = [r.run for r in records if r.WhichOneof("record_type") == "run"][0]
    config_items = items(run_info.config.update)
    assert config_items["learning_rate"] == config.learning_rate and config_items["loss"] == "dpo"
    assert config_items["remote"] == {"api_key": "**********"}
    final: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            final.update(items(record.summary.update))
    assert final["final_eval_accuracy"] == summary["final_eval"]["eval_accuracy"]
    assert final["final_tokens_per_s"] == pytest.approx(summary["tokens_per_s"])
    assert final["final_eval_margin"] == pytest.approx(summary["final_eval"]["eval_margin"])
    assert run_info.project == "pt-test" and run_info.display_name == "r1"
    assert list(run_info.tags) == ["ci"]


def test_wandb_logs_nothing_for_runs_that_did_not_ask(make_config: Any, wandb_env: Path) -> None:
    config = make_config(sinks=["jsonl"])
    run(config)
    assert not list(Path(config.log_path).glob("wandb"))


class StopAtStep3:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        class Stop:
            @hookimpl
            def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
                if step == 3:
                    raise KeyboardInterrupt

        register("stop", lambda config, options: Stop())


def test_a_resumed_run_continues_the_same_wandb_run(make_config: Any, wandb_env: Path) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(StopAtStep3())
    config = make_config(sinks=["wandb", "stop"], checkpoint_interval=2)
    with pytest.raises(KeyboardInterrupt):
        run(config, pm)
    run(config.model_copy(update={"resume": True, "sinks": ["wandb"]}))
    wandb.teardown()
    runs = sorted(Path(config.log_path).glob("wandb/offline-run-*"))
    assert len(runs) == 2
    # offline-run-<time>-<id>, with "-1" added when both sessions start within the same second
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)", r.name).group(1) for r in runs}
    assert len(ids) == 1  # one run id, two sessions


def test_eval_samples_are_logged_as_a_table_per_evaluation(make_config: Any, wandb_env: Path) -> None:
    config = make_config(sinks=["jsonl", "wandb"], eval_samples=2, eval_sample_tokens=4)
    run(config)
    wandb.teardown()
    [run_dir] = list(Path(config.log_path).glob("wandb/offline-run-*"))
    [run_file] = list(run_dir.glob("run-*.wandb"))
    logged = [items(r.history.item) for r in read_records(run_file)
              if r.WhichOneof("record_type") == "history"]
    tables = [h for h in logged if "eval_samples.path" in h]  # a table is logged as its file's fields
    assert [h["step"] for h in tables] == [0, 5]
    samples = [json.loads(line)
               for line in (Path(config.log_path) / "samples.jsonl").read_text().splitlines()]
    for entry in tables:
        assert entry["eval_samples._type"] == "table-file"
        table = json.loads((run_dir / "files" / entry["eval_samples.path"]).read_text())
        assert table["columns"] == ["step", "source", "prompt", "completion", "chosen"]
        assert table["data"] == [[r[c] for c in table["columns"]] for r in samples
                                 if r["step"] == entry["step"]]
