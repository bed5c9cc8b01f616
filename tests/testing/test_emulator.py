"""The emulator as a user runs it: a command on a port that says what clients left behind."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from preftune.testing import Emulator, Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: Any) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_command_serves_on_loopback_and_names_what_was_left_behind() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "preftune.testing.emulator", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert f"preftune emulator on http://127.0.0.1:{port}" in proc.stdout.readline()
        session = post(f"http://127.0.0.1:{port}/api/v1/create_session", {"tags": []})["session_id"]
        job = post(f"http://127.0.0.1:{port}/v1/accounts/emulated/rlorTrainerJobs?rlorTrainerJobId=j1",
                   {"trainingConfig": {"baseModel": "builtin:tiny"}})
        assert job["state"] == "JOB_STATE_RUNNING"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"left behind: trainer job j1, session {session}" in out
    assert proc.returncode == 1


def test_unknown_calls_and_bad_bodies_get_http_errors_not_hangs() -> None:
    with Server(Emulator()) as server:
        for path, status in [("/api/v1/nope", 404), ("/api/v1/forward_backward", 500)]:
            start = time.monotonic()
            try:
                post(server.url + path, {"model_id": "missing"})
            except urllib.error.HTTPError as exc:
                assert exc.code in (status, 400, 404)
                assert "error" in json.loads(exc.read())
            else:
                raise AssertionError(f"{path} answered 200")
            assert time.monotonic() - start < 5
        assert server.httpd.server_address[0] == "127.0.0.1"
