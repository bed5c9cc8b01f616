"""Shared fixtures: offline settings, the real tiny tokenizer, and small JSONL datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from preftune import Config, get_plugin_manager, get_registry
from preftune.tiny import tiny_tokenizer


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PREFTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PREFTUNE_DISABLE_PLUGIN_AUTOLOAD", "1")
    # threads = 0 reads the machine's load: two runs a test compares bit for bit (here or in a
    # subprocess) must not pick different thread counts, which round differently
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture
def registry() -> Any:
    return get_registry(get_plugin_manager(load_entrypoints=False))


def _pair_record(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    """A Format 1 (chosen/rejected messages) record."""
    user = {"role": "user", "content": prompt}
    return {
        "chosen": {"messages": [user, {"role": "assistant", "content": chosen}]},
        "rejected": {"messages": [user, {"role": "assistant", "content": rejected}]},
    }


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


WORDS = ["great", "awful", "lovely", "terrible", "fine", "bad", "good", "poor"]


def _small_dataset(path: Path, n: int = 24) -> Path:
    """``n`` pairs with an easily learned preference: chosen agrees, rejected refuses."""
    records = []
    for i in range(n):
        word = WORDS[i % len(WORDS)] + ("s" if i >= len(WORDS) else "")
        records.append(_pair_record(f"Tell me about {word} number {i}.",
                                    f"Sure, {word} is fine.", f"No, {word} is wrong."))
    return _write_jsonl(path, records)


def _tiny_config(tmp_path: Path, **overrides: Any) -> Config:
    """A fast config on the tiny model with a small dataset, quiet sinks."""
    data = {
        "base_model": "builtin:tiny",
        "dataset": str(_small_dataset(tmp_path / "data.jsonl")),
        "log_path": str(tmp_path / "logs"),
        "cache_dir": str(tmp_path / "cache"),
        "batch_size": 4,
        "learning_rate": 1e-3,
        "eval_fraction": 0.25,
        "max_seq_len": 64,
        "sinks": ["jsonl"],
    }
    data.update(overrides)
    return Config(**data)


# Test modules cannot import each other under --import-mode=importlib: helpers are fixtures.
@pytest.fixture
def pair_record() -> Any:
    return _pair_record


@pytest.fixture
def write_jsonl() -> Any:
    return _write_jsonl


@pytest.fixture
def small_dataset() -> Any:
    return _small_dataset


@pytest.fixture
def make_config(tmp_path: Path) -> Any:
    def make(**overrides: Any) -> Config:
        return _tiny_config(tmp_path, **overrides)

    return make


CONFIG_FILE = """
base_model = "builtin:tiny"
dataset = "{data}"
log_path = "{log}"
cache_dir = "{cache}"
max_seq_len = 64
batch_size = 2
epochs = {epochs}
eval_fraction = 0.25
eval_interval = 10
learning_rate = 1e-3
checkpoint_interval = {checkpoint_interval}
sinks = ["jsonl"]
"""


@pytest.fixture
def config_file() -> Any:
    """Write a TOML config for a ``preftune run`` subprocess on the tiny model."""

    def write(path: Path, data: Path, log: Path, cache: Path, epochs: int = 6,
              checkpoint_interval: int = 3) -> Path:
        path.write_text(CONFIG_FILE.format(data=data, log=log, cache=cache, epochs=epochs,
                                           checkpoint_interval=checkpoint_interval))
        return path

    return write


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A loopback emulator of the remote services (real SDK clients talk to it). Any attempt of
    this process to reach a host other than 127.0.0.1 fails the test."""
    import socket

    from preftune.testing import Server

    real = socket.getaddrinfo

    def loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1", None):
            raise AssertionError(f"a test tried to reach {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    for name in ("TINKER_BASE_URL", "FIREWORKS_BASE_URL", "FIREWORKS_TRAINER_GATEWAY_URL",
                 "FIREWORKS_CREDENTIAL_CMD", "FIREWORKS_SESSION_ID"):
        monkeypatch.delenv(name, raising=False)  # the SDKs would follow these to other hosts
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("TINKER_API_KEY", "tml-emulator-key")
    monkeypatch.setenv("FIREWORKS_API_KEY", "fw-emulator-key")
    with Server() as server:
        yield server


def _start_run(config: Path, *args: str) -> Any:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [str(Path(sys.executable).parent / "preftune"), "run", str(config), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(path: Path, count: int, proc: Any) -> None:
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {count} rows")


@pytest.fixture
def start_run() -> Any:
    """``start_run(config, *args)``: ``preftune run config *args`` as a subprocess (pipes)."""
    return _start_run


@pytest.fixture
def wait_for_rows() -> Any:
    """``wait_for_rows(path, count, proc)``: until ``path`` has ``count`` lines while ``proc`` runs."""
    return _wait_for_rows


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``preftune demo`` run once, as a user runs it in CI: a process with its output piped.
    ``log_path``, ``returncode``, ``stdout`` and ``stderr``."""
    log_path = tmp_path_factory.mktemp("demo") / "demo"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-m", "preftune.cli", "demo", "--log-path", str(log_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    return SimpleNamespace(log_path=log_path, returncode=done.returncode, stdout=done.stdout,
                           stderr=done.stderr)


def _kill_then_resume(configs: dict[str, Path], killed_log: Path, rows: int,
                      between: Any = None) -> str:
    """Run ``configs["full"]`` to the end; run ``configs["killed"]``, SIGKILL it once its
    metrics.jsonl has ``rows`` rows, call ``between()``, resume it; returns the resume's stderr."""
    import signal

    full = _start_run(configs["full"])
    assert full.wait(timeout=300) == 0, full.stderr.read()
    killed = _start_run(configs["killed"])
    _wait_for_rows(killed_log / "metrics.jsonl", rows, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    if between is not None:
        between()
    resumed = _start_run(configs["killed"], "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    return str(resumed.stderr.read())


@pytest.fixture
def kill_then_resume() -> Any:
    """``kill_then_resume(configs, killed_log, rows, between=None)``: see ``_kill_then_resume``."""
    return _kill_then_resume
