"""A W&B server that cannot be reached never holds a run up, and the API key goes nowhere (issue 15).

The "server" is a socket on 127.0.0.1 that accepts connections and never answers; nothing leaves
this machine.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from preftune import run

wandb = pytest.importorskip("wandb")

API_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, as W&B's keys


@pytest.fixture
def silent_server() -> Iterator[str]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # the kernel accepts; nobody ever reads or answers
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def online_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent_server: str) -> Iterator[None]:
    wandb.teardown()  # no W&B service or run state carried over from another test
    for key, sub in (("WANDB_CACHE_DIR", "c"), ("WANDB_DATA_DIR", "d"), ("WANDB_CONFIG_DIR", "cfg")):
        monkeypatch.setenv(key, str(tmp_path / "wandb-env" / sub))
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    yield
    wandb.teardown()


def test_an_unreachable_wandb_server_means_offline_logging_said_so_within_the_timeout(
    make_config: Any, tmp_path: Path, online_wandb: None, capfd: pytest.CaptureFixture[str]
) -> None:
    config = make_config(sinks=["jsonl", "wandb"], wandb={"init_timeout": 2.0})
    start = time.monotonic()
    summary = run(config)
    took = time.monotonic() - start
    assert summary["status"] == "completed"
    # bounded: W&B's greeting looks the user up (2 x 5 s), then init_timeout; W&B's default is 90 s
    assert took < 60, f"{took:.0f} s: start-up was not bounded"
    out, err = capfd.readouterr()
    assert "wandb: cannot start the run on the W&B server (" in err
    assert f"logging offline under {config.log_path} instead" in err
    assert list((Path(config.log_path) / "wandb").glob("offline-run-*/run-*.wandb"))
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(written) > 10 and API_KEY not in out + err
    assert [p for p in written if API_KEY.encode() in p.read_bytes()] == []
