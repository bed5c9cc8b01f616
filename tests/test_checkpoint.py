"""Checkpoints, resume (including after SIGKILL) and warm starts, on the real tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from preftune import Config, ConfigError, checkpoint, get_plugin_manager, hookimpl, run

TIMING = {"elapsed_s", "tokens_per_s", "peak_mem_mb"}  # measures of the machine, not of training


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in items]


def weights(log_path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(log_path / "final" / "model.safetensors"))


def test_checkpoints_are_written_and_pruned(make_config: Any) -> None:
    config = make_config(epochs=2, checkpoint_interval=3, keep_checkpoints=2)
    run(config)
    root = Path(config.log_path) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000009"]
    state = json.loads((root / "step-00000009" / "trainer_state.json").read_text())
    assert state["step"] == 9 and state["tokens"] > 0 and "first_eval" in state
    assert len(state["config_sha256"]) == len(state["data_sha256"]) == 64
    backend_dir = root / "step-00000009" / "backend"
    assert (backend_dir / "model.safetensors").exists() and (backend_dir / "optimizer.pt").exists()


class Stopper:
    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step == 6:
            raise KeyboardInterrupt


class StopperPlugin:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("stopper", lambda config, options: Stopper())


def test_resume_in_process_matches_the_uninterrupted_run(make_config: Any, tmp_path: Path) -> None:
    common = {"epochs": 3, "checkpoint_interval": 4, "eval_interval": 5, "lr_schedule": "cosine",
              "warmup_steps": 2, "eval_samples": 2, "eval_sample_tokens": 5}
    full = make_config(log_path=str(tmp_path / "full"), **common)
    run(full)
    # the "interrupted" run: a sink stops it after step 6 (checkpoint at 4), then resume
    part = make_config(log_path=str(tmp_path / "part"), **common)
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(StopperPlugin())
    with pytest.raises(KeyboardInterrupt):
        run(part.model_copy(update={"sinks": ["jsonl", "stopper"]}), pm)
    assert len(rows(tmp_path / "part" / "metrics.jsonl")) == 6  # sinks run in config order: jsonl saw 6
    run(part.model_copy(update={"resume": True}))
    assert without_timing(rows(tmp_path / "full" / "metrics.jsonl")) == without_timing(
        rows(tmp_path / "part" / "metrics.jsonl"))
    assert rows(tmp_path / "full" / "eval.jsonl") == rows(tmp_path / "part" / "eval.jsonl")
    samples = rows(tmp_path / "full" / "samples.jsonl")  # the stopped run's step-5 samples redone once
    assert samples == rows(tmp_path / "part" / "samples.jsonl") and len(samples) == 2 * 4
    for name, tensor in weights(tmp_path / "full").items():
        torch.testing.assert_close(tensor, weights(tmp_path / "part")[name], rtol=0, atol=0)


def test_resume_refuses_a_checkpoint_of_other_settings(make_config: Any) -> None:
    config = make_config(checkpoint_interval=2)
    run(config)
    shutil.rmtree(Path(config.log_path) / "final")  # else a completed run is not resumed at all
    with pytest.raises(ConfigError, match="different training settings .config_sha256 differs"):
        run(config.model_copy(update={"resume": True, "learning_rate": 5e-4}))
    # settings that do not change training may differ
    run(config.model_copy(update={"resume": True, "eval_interval": 1, "sinks": []}))


def test_resume_without_checkpoint_starts_fresh(make_config: Any, capsys: Any) -> None:
    summary = run(make_config(resume=True))
    assert summary["status"] == "completed"
    assert "no checkpoint" in capsys.readouterr().err


def preftune(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "preftune"), *args]


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(
    tmp_path: Path, small_dataset: Any, config_file: Any
) -> None:
    data = small_dataset(tmp_path / "d.jsonl")
    cfgs = {}
    for name in ("full", "killed"):
        cfgs[name] = config_file(tmp_path / f"{name}.toml", data, tmp_path / name, tmp_path / "c")
    env = {**os.environ, "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    subprocess.run(preftune("run", str(cfgs["full"])), check=True, env=env, capture_output=True)
    total = len(rows(tmp_path / "full" / "metrics.jsonl"))
    assert total == 6 * math.ceil(18 / 2)

    proc = subprocess.Popen(preftune("run", str(cfgs["killed"])), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 20 <= done < total, "the run must be killed mid-way"
    assert not (tmp_path / "killed" / "final").exists()

    out = subprocess.run(preftune("run", str(cfgs["killed"]), "--resume"), env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stderr
    resumed_at = int(out.stderr.split("(step ")[1].split(")")[0])
    assert 18 <= resumed_at <= done and resumed_at % 3 == 0
    assert without_timing(rows(metrics)) == without_timing(rows(tmp_path / "full" / "metrics.jsonl"))
    assert rows(tmp_path / "killed" / "eval.jsonl") == rows(tmp_path / "full" / "eval.jsonl")
    for name, tensor in weights(tmp_path / "full").items():
        torch.testing.assert_close(tensor, weights(tmp_path / "killed")[name], rtol=0, atol=0)


def test_warm_start_from_a_model_dir_uses_it_as_policy_and_reference(
    make_config: Any, tmp_path: Path, capsys: Any
) -> None:
    sft = make_config(log_path=str(tmp_path / "sft"), epochs=3, learning_rate=3e-3)
    first = run(sft)
    capsys.readouterr()
    dpo = make_config(log_path=str(tmp_path / "dpo"), init_from=first["weights"])
    summary = run(dpo)
    start = rows(tmp_path / "dpo" / "eval.jsonl")[0]
    # policy == reference == the warm-start weights: loss ln 2, and the policy's log-probs are
    # the trained model's, not the base model's
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["eval_logps_chosen"] == pytest.approx(first["final_eval"]["eval_logps_chosen"],
                                                       abs=1e-3)
    assert summary["status"] == "completed"
    err = capsys.readouterr().err
    assert "stale" in err and "init_files_sha256" in err  # the cache key includes the warm start


def test_warm_start_from_an_adapter_and_from_a_checkpoint(make_config: Any, tmp_path: Path) -> None:
    sft = make_config(log_path=str(tmp_path / "sft"), lora_rank=4, learning_rate=1e-2,
                      checkpoint_interval=5, epochs=2)
    first = run(sft)
    for source in (first["weights"], str(tmp_path / "sft" / "checkpoints" / "step-00000010")):
        config = make_config(log_path=str(tmp_path / "dpo"), lora_rank=4, init_from=source)
        summary = run(config)
        start = rows(tmp_path / "dpo" / "eval.jsonl")[0]
        assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert summary["initial_eval"]["eval_logps_chosen"] == pytest.approx(
            first["final_eval"]["eval_logps_chosen"], abs=1e-3)


def test_init_from_a_wrong_directory_is_a_clear_error(make_config: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a preftune checkpoint"):
        run(make_config(init_from=str(tmp_path)))


def test_a_fresh_run_does_not_mix_its_checkpoints_with_an_earlier_runs(make_config: Any) -> None:
    run(make_config(checkpoint_interval=2, keep_checkpoints=1))
    first = checkpoint.complete(make_config().log_path)
    assert [p.name for p in first] == ["step-00000004"]
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(newest: step-00000004\)"
                                          r": continue it with --resume"):
        run(make_config(checkpoint_interval=1, epochs=2))
    assert checkpoint.complete(make_config().log_path) == first


def test_pruning_never_deletes_the_checkpoint_just_written(make_config: Any, tmp_path: Path) -> None:
    config = make_config(checkpoint_interval=2, keep_checkpoints=1)
    later = checkpoint.root(config.log_path) / "step-00009999"  # e.g. a copy from another run
    later.mkdir(parents=True)
    (later / checkpoint.STATE_FILE).write_text('{"step": 9999}')
    with pytest.raises(ConfigError):
        run(config)  # refused: a fresh run on it
    path = checkpoint.save(config.log_path, 2, _Saver(), {}, keep=1)
    assert path.exists() and later.exists()


class _Saver:
    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)


def test_waiting_and_retry_settings_may_change_on_resume_the_training_ones_not(registry: Any) -> None:
    def digest(**settings: Any) -> str:
        config = Config(base_model="builtin:tiny", dataset="d.jsonl", backend="tinker", **settings)
        return checkpoint.training_hash(config, set(registry.names("sink")), registry.operational_keys())

    base = digest(tinker={"timeout_s": 30})
    assert digest(tinker={"timeout_s": 90, "retries": 5, "connect_timeout_s": 3}) == base
    assert digest(tinker={"timeout_s": 30, "train_unembed": True}) != base
    assert "fireworks.poll_interval_s" in registry.operational_keys()
