"""The ``tinker`` backend, through the real ``tinker`` client against the loopback emulator."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from preftune import ConfigError, TrainingError, run


def metrics(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def losses(log_path: Path) -> list[float]:
    return [row["loss"] for row in metrics(log_path)]


def tinker_config(make_config: Any, emulator: Any, tmp_path: Path, name: str, **overrides: Any) -> Any:
    settings = {"lora_rank": 4, "epochs": 2, "log_path": str(tmp_path / name),
                "tinker": {"base_url": emulator.url, "timeout_s": 60}} | overrides
    return make_config(backend="tinker", **settings)


@pytest.mark.parametrize(("loss", "settings"), [
    ("dpo", {}), ("orpo", {"grad_accum": 2, "max_grad_norm": 0.5, "weight_decay": 0.1,
                           "lr_schedule": "cosine", "warmup_steps": 2})])
def test_training_through_tinker_gives_the_local_backends_losses(
        make_config: Any, emulator: Any, tmp_path: Path, loss: str, settings: dict[str, Any]) -> None:
    local = run(make_config(loss=loss, lora_rank=4, epochs=2, log_path=str(tmp_path / "local"),
                            **settings))
    remote = run(tinker_config(make_config, emulator, tmp_path, "tinker", loss=loss, **settings))
    expected, got = losses(tmp_path / "local"), losses(tmp_path / "tinker")
    assert len(got) == len(expected) == (10 if not settings else 6)
    assert got == pytest.approx(expected, abs=1e-5)
    for key, value in local["final_eval"].items():
        assert remote["final_eval"][key] == pytest.approx(value, abs=1e-4), key
    # the final adapter is saved on the service and named, next to the tokenizer
    saved = json.loads((tmp_path / "tinker" / "final" / "remote.json").read_text())
    assert saved["sampler_weights"].startswith("tinker://") and saved["lora_rank"] == 4
    assert remote["remote_weights"] == saved["sampler_weights"]
    assert (tmp_path / "tinker" / "final" / "tokenizer.json").exists()
    assert [s["finished"] for s in emulator.emulator.sessions.values()] == ["success"]
    assert emulator.emulator.leftovers() == []
    key = os.environ["TINKER_API_KEY"]
    for file in (tmp_path / "tinker").rglob("*"):
        assert not file.is_file() or key.encode() not in file.read_bytes(), file


def test_settings_it_cannot_use_are_refused_before_anything_loads(
        make_config: Any, emulator: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LoRA adapters only: set lora_rank > 0"):
        run(tinker_config(make_config, emulator, tmp_path, "full", lora_rank=0))
    with pytest.raises(ConfigError, match="tinker.base_url = 'ftp://x' is not an http"):
        run(tinker_config(make_config, emulator, tmp_path, "url", tinker={"base_url": "ftp://x"}))
    assert not (tmp_path / "full").exists() and not (tmp_path / "url").exists()
    assert emulator.emulator.requests == []


def test_a_missing_key_names_its_variable(make_config: Any, emulator: Any, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINKER_API_KEY")
    with pytest.raises(ConfigError, match="set the environment variable TINKER_API_KEY"):
        run(tinker_config(make_config, emulator, tmp_path, "nokey"))
    assert emulator.emulator.requests == []


def test_transient_faults_are_retried_and_change_nothing(make_config: Any, emulator: Any,
                                                         tmp_path: Path) -> None:
    run(tinker_config(make_config, emulator, tmp_path, "clean", epochs=1))
    faults = emulator.emulator.faults
    faults.errors.update({"/api/v1/forward_backward": 3, "/api/v1/optim_step": 2})
    faults.drops.update({"/api/v1/retrieve_future": 2})
    faults.errors_after.update({"/api/v1/forward_backward": 2, "/api/v1/optim_step": 1})
    faults.pending = 2  # every result is "try again" twice first
    run(tinker_config(make_config, emulator, tmp_path, "faulty", epochs=1))
    assert set(faults.errors.values()) == set(faults.errors_after.values()) == {0}
    assert faults.drops == {"/api/v1/retrieve_future": 0}
    assert losses(tmp_path / "faulty") == losses(tmp_path / "clean")
    assert emulator.emulator.leftovers() == []


def test_a_trainer_that_dies_mid_run_stops_it_and_ends_the_session(
        make_config: Any, emulator: Any, tmp_path: Path) -> None:
    emulator.emulator.faults.die_after_steps = 2
    with pytest.raises(TrainingError, match=r"tinker: forward_backward failed \(session [^)]+\): .*died"):
        run(tinker_config(make_config, emulator, tmp_path, "dies"))
    assert len(metrics(tmp_path / "dies")) == 2
    assert [s["finished"] for s in emulator.emulator.sessions.values()] == ["errored"]


def test_a_slow_answer_past_the_timeout_is_a_clear_error(make_config: Any, emulator: Any,
                                                         tmp_path: Path) -> None:
    emulator.emulator.faults.delay["/api/v1/optim_step"] = 5
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"tinker: optim_step: no result within 1 s"):
        run(tinker_config(make_config, emulator, tmp_path, "slow",
                          tinker={"base_url": emulator.url, "timeout_s": 1}))
    assert time.monotonic() - start < 30
    emulator.emulator.faults.delay.clear()
    assert [s["finished"] for s in emulator.emulator.sessions.values()] == ["errored"]


def test_a_sigkilled_tinker_run_resumes_to_the_same_losses(
        emulator: Any, tmp_path: Path, small_dataset: Any, config_file: Any,
        kill_then_resume: Any) -> None:
    data = small_dataset(tmp_path / "d.jsonl")
    configs = {}
    for name in ("full", "killed"):
        configs[name] = config_file(tmp_path / f"{name}.toml", data, tmp_path / name, tmp_path / "c",
                                    epochs=3)
        with open(configs[name], "a") as f:
            f.write(f'backend = "tinker"\nlora_rank = 4\n[tinker]\nbase_url = "{emulator.url}"\n')
    assert "resumed from" in kill_then_resume(configs, tmp_path / "killed", 14)
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_sigterm_stops_a_tinker_run_and_marks_the_session_interrupted(
        emulator: Any, tmp_path: Path, small_dataset: Any, config_file: Any, start_run: Any,
        wait_for_rows: Any) -> None:
    data = small_dataset(tmp_path / "d.jsonl")
    config = config_file(tmp_path / "c.toml", data, tmp_path / "logs", tmp_path / "c", epochs=20)
    with open(config, "a") as f:
        f.write(f'backend = "tinker"\nlora_rank = 4\n[tinker]\nbase_url = "{emulator.url}"\n')
    proc = start_run(config)
    wait_for_rows(tmp_path / "logs" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert "--resume" in proc.stderr.read()
    assert [s["finished"] for s in emulator.emulator.sessions.values()] == ["interrupted"]


def test_eval_samples_are_the_greedy_completions_of_the_weights_on_the_service(
        make_config: Any, emulator: Any, tmp_path: Path) -> None:
    """At each evaluation a sampler save of the current adapter, sampled greedily by the service:
    the first samples are the local backend's (the same initial weights), the last are what
    transformers' generate says with the adapter the run left on the service."""
    import torch
    from peft import PeftModel

    from preftune.tiny import tiny_model, tiny_tokenizer

    settings = {"eval_samples": 3, "eval_sample_tokens": 8, "learning_rate": 2e-2, "eval_interval": 5}
    run(make_config(lora_rank=4, epochs=2, log_path=str(tmp_path / "local"), **settings))
    run(tinker_config(make_config, emulator, tmp_path, "tinker", **settings))

    def samples(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]

    got = samples("tinker")
    assert [r["step"] for r in got] == [0] * 3 + [5] * 3 + [10] * 3
    assert got[:3] == samples("local")[:3]
    # the final adapter as the service holds it, in a local peft model
    final = json.loads((tmp_path / "tinker" / "final" / "remote.json").read_text())["sampler_weights"]
    saved = emulator.emulator.saved[(final, "sampler_weights")]["dir"]
    weights = torch.load(saved / "weights.pt", weights_only=True)
    model = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "local" / "final")).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    tokenizer = tiny_tokenizer()
    for row in got[-3:]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"].split("\n")[1]}],
                                               add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, eos_token_id=[tokenizer.eos_token_id], pad_token_id=0)
        assert row["completion"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert {r["completion"] for r in got[-3:]} != {r["completion"] for r in got[:3]}  # it learned
    assert emulator.emulator.leftovers() == []
