"""Deployment weight sync on the local backend, read by a real loader while training runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from preftune import ConfigError, get_plugin_manager, hookimpl, run
from preftune.backend_utils import files_hash


def test_snapshots_manifest_and_current_pointer(make_config: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = make_config(sinks=["weight_sync"], epochs=2,
                         weight_sync={"weight_sync_interval": 4, "keep_snapshots": 2})
    summary = run(config)
    root = Path(config.log_path) / "deployments" / "preftune"
    snapshots = sorted(p.name for p in (root / "snapshots").iterdir())
    assert snapshots == ["step-00000008", "step-00000010"]  # 4, 8, then the end (10); keep 2
    assert os.readlink(root / "current") == "snapshots/step-00000010"
    manifest = json.loads((root / "current" / "manifest.json").read_text())
    assert manifest["step"] == summary["steps"] == 10
    assert manifest["base_model"] == "builtin:tiny" and manifest["kind"] == "full"
    assert manifest["sha256"] == files_hash(root / "current")
    model = AutoModelForCausalLM.from_pretrained(root / "current")
    assert AutoTokenizer.from_pretrained(root / "current").chat_template
    from safetensors.torch import load_file

    final = load_file(str(Path(summary["weights"]) / "model.safetensors"))
    import torch

    for name, tensor in model.state_dict().items():
        if name in final:
            torch.testing.assert_close(tensor, final[name])


def test_lora_run_publishes_an_adapter_peft_can_load(make_config: Any) -> None:
    from peft import PeftModel

    from preftune.tiny import tiny_model

    config = make_config(sinks=["weight_sync"], lora_rank=4, weight_sync={"deployment_id": "dpo"})
    run(config)
    current = Path(config.log_path) / "deployments" / "dpo" / "current"
    assert json.loads((current / "manifest.json").read_text())["kind"] == "adapter"
    assert PeftModel.from_pretrained(tiny_model(), current) is not None


class NoPublishPlugin:
    """A backend without ``publish_weights``, as a third party's might be."""

    @hookimpl
    def register_backends(self, register: Any) -> None:
        from preftune.plugins.local import LocalBackend, LocalOptions

        class NoPublish(LocalBackend):
            publish_weights = None  # type: ignore[assignment]

        register("nopublish", lambda config, options, tok: NoPublish(config, LocalOptions(), tok))


def test_a_backend_that_cannot_publish_is_a_clear_error(make_config: Any) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(NoPublishPlugin())
    with pytest.raises(ConfigError, match="backend 'nopublish' cannot publish weights"):
        run(make_config(sinks=["weight_sync"], backend="nopublish"), pm)


CONFIG = """
base_model = "builtin:tiny"
dataset = "{data}"
log_path = "{log}"
cache_dir = "{log}/cache"
max_seq_len = 64
batch_size = 2
epochs = 4
learning_rate = 1e-3
sinks = ["jsonl", "weight_sync"]
[weight_sync]
weight_sync_interval = 2
keep_snapshots = 4
"""


def test_a_server_hot_loads_current_while_training_continues(
    tmp_path: Path, small_dataset: Any
) -> None:
    from transformers import AutoModelForCausalLM

    data = small_dataset(tmp_path / "d.jsonl")
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(data=data, log=tmp_path / "logs"))
    exe = Path(sys.executable).parent / "preftune"
    proc = subprocess.Popen([str(exe), "run", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    current = tmp_path / "logs" / "deployments" / "preftune" / "current"
    seen: list[int] = []
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if not current.exists():
                time.sleep(0.01)
                continue
            snapshot = current.resolve()  # resolve once: this snapshot stays whole while we load
            model = AutoModelForCausalLM.from_pretrained(snapshot)
            manifest = json.loads((snapshot / "manifest.json").read_text())
            assert model.config.model_type == "qwen3"
            assert snapshot.name == f"step-{manifest['step']:08d}"
            seen.append(manifest["step"])
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0
    final = json.loads((current / "manifest.json").read_text())["step"]
    assert final == 4 * 12  # 23 training pairs / 2 per step, 4 epochs
    assert len(set(seen)) >= 2, f"loads while training saw steps {seen}"
    assert seen == sorted(seen) and all(s % 2 == 0 for s in seen)


def fireworks_sync_config(make_config: Any, emulator: Any, tmp_path: Path, deployment: str,
                          **fireworks: Any) -> Any:
    """A full fine-tune (so its DPO reference would be a second trainer job) syncing to
    ``deployment`` on the emulator."""
    return make_config(backend="fireworks", epochs=1, log_path=str(tmp_path / deployment),
                       sinks=["jsonl", "weight_sync"], weight_sync={"deployment_id": deployment},
                       fireworks={"base_url": emulator.url, "poll_interval_s": 0.05, "timeout_s": 60,
                                  **fireworks})


def assert_nothing_computed(emulator: Any, log_path: Path) -> None:
    """No reference pass, no step: no forward of any kind, no reference job, no metrics."""
    requests = emulator.emulator.requests
    assert not [r.path for r in requests if "forward" in r.path]
    assert [j for j, job in emulator.emulator.jobs.items() if job["forward_only"]] == []
    assert not (log_path / "metrics.jsonl").exists()
    assert emulator.emulator.leftovers() == []  # the policy job was deleted all the same


@pytest.mark.parametrize(("state", "problem"), [
    (None, r"the service \S+ has no such deployment"),
    ("FAILED", "the deployment is FAILED; weight sync needs one that can take hot-loads")])
def test_fireworks_deployment_missing_or_failed_is_refused_before_any_work(
        make_config: Any, emulator: Any, tmp_path: Path, state: str | None, problem: str) -> None:
    if state is not None:
        emulator.emulator.add_deployment("serving", "builtin:tiny")["state"] = state
    config = fireworks_sync_config(make_config, emulator, tmp_path, "serving")
    with pytest.raises(ConfigError, match=f"field 'weight_sync.deployment_id' = 'serving': {problem}"):
        run(config)
    assert_nothing_computed(emulator, tmp_path / "serving")


def test_fireworks_deployment_the_service_cannot_be_asked_about_is_a_clear_error(
        make_config: Any, emulator: Any, tmp_path: Path) -> None:
    from preftune import TrainingError

    emulator.emulator.add_deployment("serving", "builtin:tiny")
    emulator.emulator.faults.errors["deployments/serving"] = 10_000  # 503s, which the SDK retries
    config = fireworks_sync_config(make_config, emulator, tmp_path, "serving", connect_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"field 'weight_sync.deployment_id' = 'serving': could not "
                       r"check the deployment before training: fireworks: checking deployment serving: "
                       r"no result within 3 s"):
        run(config)
    assert time.monotonic() - start < 30
    emulator.emulator.faults.errors.clear()
    assert_nothing_computed(emulator, tmp_path / "serving")


def test_fireworks_deployment_still_creating_but_serving_is_accepted_as_the_sdk_does(
        make_config: Any, emulator: Any, tmp_path: Path) -> None:
    deployment = emulator.emulator.add_deployment("serving", "builtin:tiny")
    deployment["state"] = "CREATING"  # hot-load deployments may stay CREATING while they serve
    run(fireworks_sync_config(make_config, emulator, tmp_path, "serving"))
    assert deployment["snapshot"] == deployment["hot_loads"][-1]
    assert paths_before(emulator, "deployments/serving", "/inference/v1/completions", "forward")


def test_fireworks_deployment_still_starting_lets_training_start_and_says_so(
        make_config: Any, emulator: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A deployment that is not ready yet (CREATING, not serving) is no reason to hold training:
    by default it is first hot-loaded at the end. The run says so, trains, and syncs then."""
    deployment = emulator.emulator.add_deployment("serving", "builtin:tiny")
    deployment["state"] = "CREATING"
    emulator.emulator.faults.errors["/inference/v1/completions"] = 10_000  # it does not serve yet
    summary = run(fireworks_sync_config(make_config, emulator, tmp_path, "serving", connect_timeout_s=1,
                                        warmup_after_hotload=False))
    emulator.emulator.faults.errors.clear()
    assert summary["status"] == "completed"
    assert "deployment serving is CREATING, not READY yet; training starts" in capsys.readouterr().err
    assert deployment["snapshot"] == deployment["hot_loads"][-1]


def paths_before(emulator: Any, first: str, second: str, then: str) -> bool:
    """The emulator saw ``first``, then ``second``, both before any request matching ``then``."""
    paths = [r.path for r in emulator.emulator.requests]
    at = [next(i for i, p in enumerate(paths) if fragment in p) for fragment in (first, second, then)]
    return at[0] < at[1] < at[2]
