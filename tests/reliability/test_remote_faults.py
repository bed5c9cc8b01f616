"""The remote backends against servers that are not the service, and failure paths that must stay
bounded (issue 23). Every server here is on 127.0.0.1; nothing leaves this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from preftune import TrainingError, run

PAGE = b"<html><body><h1>Not Found</h1></body></html>"


def web_server(health: bool) -> type[BaseHTTPRequestHandler]:
    """An ordinary web server: a page saying "not found" for every GET and "not implemented" for
    every POST; with ``health``, Tinker's health check alone answers as the service would."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            if health and self.path.startswith("/api/v1/healthz"):
                self._answer(200, b'{"status": "ok"}', "application/json")
            else:
                self._answer(404, PAGE, "text/html")

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(501, PAGE, "text/html")

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def html_server() -> Iterator[str]:
    yield from serve(web_server(health=False))


@pytest.fixture
def html_server_with_health() -> Iterator[str]:
    yield from serve(web_server(health=True))


def run_cli(tmp_path: Path, config: str, env: dict[str, str]
            ) -> tuple[subprocess.CompletedProcess[str], float]:
    path = tmp_path / "config.toml"
    path.write_text(config)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "preftune.cli", "run", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    return done, time.monotonic() - start


def user_env(**extra: str) -> dict[str, str]:
    """The environment a user has: the SDKs' own defaults (telemetry on), a key set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "FIREWORKS_"))}
    return env | extra


@pytest.mark.parametrize("backend", ["tinker", "fireworks"])
def test_an_ordinary_web_server_as_the_service_is_one_clear_error_within_seconds_with_defaults(
        tmp_path: Path, small_dataset: Any, html_server: str, backend: str) -> None:
    """With the default timeouts (600 s a call): the run ends in seconds, names the URL, says
    nothing of deleting jobs by hand, and leaves no job listed."""
    data = small_dataset(tmp_path / "d.jsonl")
    log = tmp_path / "run"
    done, took = run_cli(tmp_path, f"""
base_model = "builtin:tiny"
dataset = "{data}"
log_path = "{log}"
cache_dir = "{tmp_path / 'cache'}"
backend = "{backend}"
lora_rank = 4
[{backend}]
base_url = "{html_server}"
""", user_env(TINKER_API_KEY="tml-user-key", FIREWORKS_API_KEY="fw-user-key"))
    assert done.returncode != 0 and took < 30, (took, done.stderr)
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and html_server in error, done.stderr
    assert "Traceback" not in done.stderr and "by hand" not in done.stderr
    assert not (log / "fireworks_jobs.json").exists()


def test_closing_a_tinker_session_is_bounded_while_a_call_is_stuck(
        tmp_path: Path, small_dataset: Any, html_server_with_health: str) -> None:
    """The health check passes, every other call gets a web page: creating the client times
    out, and the session's close (which the SDK blocks while its call is stuck) is bounded too."""
    data = small_dataset(tmp_path / "d.jsonl")
    done, took = run_cli(tmp_path, f"""
base_model = "builtin:tiny"
dataset = "{data}"
log_path = "{tmp_path / 'run'}"
cache_dir = "{tmp_path / 'cache'}"
backend = "tinker"
lora_rank = 4
[tinker]
base_url = "{html_server_with_health}"
timeout_s = 4
connect_timeout_s = 2
""", user_env(TINKER_API_KEY="tml-user-key"))
    assert done.returncode == 2 and took < 4 + 2 + 15, (took, done.stderr)
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: tinker: creating the LoRA training client: no result within 4 s "
        f"(service {html_server_with_health})")
    assert "tinker: closing the session: no result within 2 s" in done.stderr


def test_a_key_the_service_refuses_is_one_clear_error_and_no_job_is_listed(
        make_config: Any, emulator: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The job was never made: neither the ledger nor any advice to delete it by hand names it."""
    emulator.emulator.api_keys = ("fw-the-right-key",)
    with pytest.raises(TrainingError, match=r"creating policy trainer job \S+ failed .*401") as info:
        run(make_config(backend="fireworks", lora_rank=4, log_path=str(tmp_path / "refused"),
                        fireworks={"base_url": emulator.url, "timeout_s": 30}))
    assert "\n" not in str(info.value)
    assert emulator.emulator.leftovers() == []
    assert "by hand" not in capfd.readouterr().err
    assert not (tmp_path / "refused" / "fireworks_jobs.json").exists()
