"""A loopback emulator of the remote training services, for tests and dry runs.

``python -m preftune.testing.emulator --port 8765`` serves, on 127.0.0.1 only, the endpoints that
the real ``tinker`` and ``fireworks.training.sdk`` clients call for training: sessions, models,
forward, forward/backward, optimizer steps, saved state, sampler weights, futures, and for
Fireworks the account, trainer jobs, deployments and hot-load. It computes with torch on
``builtin:tiny`` or any local model directory (see :mod:`preftune.testing.trainer`); names a
real config uses (``accounts/fireworks/models/qwen3-8b``) are mapped to those with
``--model NAME=PATH`` or ``PREFTUNE_EMULATOR_MODELS`` (see :func:`model_map`). A config selects it
with ``[tinker] base_url = "http://127.0.0.1:8765"`` (or ``[fireworks]``). Saved checkpoints are
listed and promoted to models as the Fireworks control plane does (:mod:`checkpoint_routes`).

Faults can be switched on to test clients: bursts of 5xx answers, slow answers, dropped
connections, trainer jobs that never become ready or that die mid-run (see :class:`Faults`).
On shutdown it prints every job, session or deployment the clients left behind.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import PreftuneError
from . import checkpoint_routes, fireworks_routes, sampling_routes, session_routes
from .exchange import Answer, Failed, Reply, Request
from .trainer import Trainer

MODELS_ENV = "PREFTUNE_EMULATOR_MODELS"
MODELS_SETTING = f"--model NAME=PATH (or {MODELS_ENV}='NAME=PATH,...')"


@dataclass
class Faults:
    """Switches for fault injection; a test sets them and the emulator obeys them.

    ``errors``: path pattern -> how many of the next matching requests answer 503 (before doing
    anything); ``errors_after``: the same, after the request was carried out (the client sends it
    again, and the service answers it once: requests are deduplicated by their idempotency key).
    ``pending``: how many times ``retrieve_future`` answers "try again" before each result.
    ``drops``: path pattern -> how many of the next matching requests get the connection closed
    with no answer. ``delay``: path pattern -> seconds to sleep before answering.
    ``never_ready``: trainer jobs stay in JOB_STATE_CREATING. ``die_after_steps``: the trainer
    fails every request after that many optimizer steps (a job that died mid-run).
    """

    errors: dict[str, int] = field(default_factory=dict)
    errors_after: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    delay: dict[str, float] = field(default_factory=dict)
    never_ready: bool = False
    die_after_steps: int | None = None

    def take(self, table: dict[str, int], path: str) -> bool:
        for pattern, left in table.items():
            if left > 0 and re.search(pattern, path):
                table[pattern] = left - 1
                return True
        return False

    def sleep_for(self, path: str) -> float:
        return max((s for p, s in self.delay.items() if re.search(p, path)), default=0.0)


Route = Callable[["Emulator", Request, re.Match[str]], Any]


class Emulator:
    """The service's state: sessions, models (each a :class:`Trainer`), futures, jobs, files."""

    def __init__(self, root: str | Path | None = None, lora_alpha: float = 32.0,
                 api_keys: tuple[str, ...] | None = None, models: dict[str, str] | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="preftune-emulator-"))
        self.lora_alpha = lora_alpha
        self.model_map = dict(models or {})  # a service's model name -> a local one (see model_map)
        self.api_keys = api_keys  # None = any key is accepted
        self.faults = Faults()
        self.lock = threading.RLock()  # one computation at a time, like one trainer
        self.ids = itertools.count(1)
        self.sessions: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.futures: dict[str, Answer] = {}
        self.saved: dict[tuple[str, str], dict[str, Any]] = {}  # (place, kind) -> saved state
        self.promoted: dict[str, dict[str, Any]] = {}  # model name -> the model (promote)
        self.operations: dict[str, dict[str, Any]] = {}
        self.answered: dict[str, Answer] = {}  # by idempotency key
        self.polls: dict[str, int] = {}  # try-again answers given, by future
        self.jobs: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self.routes: list[tuple[str, re.Pattern[str], Route]] = []
        for method, pattern, route in (sampling_routes.ROUTES  # first: it answers Tinker's sampler saves
                                       + session_routes.ROUTES + fireworks_routes.ROUTES
                                       + checkpoint_routes.ROUTES):
            self.routes.append((method, re.compile(pattern + "$"), route))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids)}"

    def future(self, answer: Answer) -> dict[str, str]:
        """Store a result to be fetched with retrieve_future; returns the untyped future."""
        request_id = self.new_id("req")
        self.futures[request_id] = answer
        return {"request_id": request_id}

    def handle(self, request: Request) -> Answer:
        self.requests.append(request)
        if self.faults.take(self.faults.errors, request.path):
            return Answer(503, {"error": "injected fault: service unavailable"})
        self.check_key(request)
        key = request.headers.get("x-idempotency-key")
        if key and key in self.answered:  # a retry of a request already carried out
            return self.answered[key]
        answer = self.route(request)
        if key and answer.status < 500:
            self.answered[key] = answer
        if self.faults.take(self.faults.errors_after, request.path):
            return Answer(503, {"error": "injected fault: service unavailable (after the work)"})
        return answer

    def route(self, request: Request) -> Answer:
        for method, pattern, route in self.routes:
            match = pattern.match(request.path)
            if match and method == request.method:
                try:
                    result = route(self, request, match)
                except Reply as reply:
                    return Answer(reply.status, reply.body)
                except Failed as failed:
                    return Answer(200, self.future(Answer(200, failed.body)))
                return result if isinstance(result, Answer) else Answer(200, result)
        return Answer(404, {"error": f"the emulator does not serve {request.method} {request.path}"})

    def local_model(self, name: str) -> str:
        """The local name (a directory, ``builtin:tiny``) the emulator loads for the service's
        model ``name``: its mapping (``*`` maps every name not mapped otherwise), else ``name``
        itself, unless it is a service's name (``accounts/<account>/models/<model>``), which
        is an error answer naming the setting."""
        local = self.model_map.get(name) or self.model_map.get("*")
        if local:
            return local
        if re.fullmatch(r"accounts/[^/]+/models/[^/]+", name):
            raise Reply(400, f"the emulator cannot load {name!r}: map it to a local model directory "
                        f"or builtin:tiny with {MODELS_SETTING.replace('NAME', name, 1)}")
        return name

    def trainer(self, base_model: str, **settings: Any) -> Trainer:
        """A :class:`Trainer` on the local model ``base_model`` maps to; a model that does not
        load is an error answer (400: the client's request cannot work), not a server error."""
        local = self.local_model(base_model)
        try:
            return Trainer(local, **settings)
        except (PreftuneError, OSError, ValueError) as exc:
            raise Reply(400, f"the emulator cannot load {base_model!r} (as {local!r}): {exc}; map the "
                        f"name to a local model directory or builtin:tiny with {MODELS_SETTING}") from None

    def check_key(self, request: Request) -> None:
        if self.api_keys is None:
            return
        keys = {request.headers.get("x-api-key", "")}
        auth = request.headers.get("authorization", "")
        keys.add(auth.removeprefix("Bearer ").strip())
        if not keys & set(self.api_keys):
            raise Reply(401, "invalid API key")

    def add_deployment(self, deployment_id: str, base_model: str) -> dict[str, Any]:
        """A deployment that exists before any client runs (one a user made to serve the model)."""
        self.deployments[deployment_id] = {"state": "READY", "replicas": 1, "base_model": base_model,
                                           "created": False, "snapshot": None, "hot_loads": []}
        return self.deployments[deployment_id]

    def leftovers(self) -> list[str]:
        """Everything a client created and did not delete, finish or scale to zero (a Fireworks
        session lives and ends with its trainer job; a Tinker session must be finished)."""
        left = [f"trainer job {j}" for j, job in self.jobs.items() if not job.get("deleted")]
        left += [f"session {s}" for s, session in self.sessions.items()
                 if not session.get("finished") and not session.get("job")]
        left += [f"deployment {d}" for d, dep in self.deployments.items()
                 if not dep.get("deleted") and dep.get("replicas", 0) > 0 and dep.get("created")]
        return left


def _handler(emulator: Emulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: tests read emulator.requests
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            path, _, query = self.path.partition("?")
            request = Request(self.command, path, dict(re.findall(r"([^&=]+)=([^&]*)", query)),
                              {k.lower(): v for k, v in self.headers.items()}, body)
            if emulator.faults.take(emulator.faults.drops, path):
                self.close_connection = True
                self.connection.close()
                return
            time.sleep(emulator.faults.sleep_for(path))
            try:
                answer = emulator.handle(request)
            except Reply as reply:
                answer = Answer(reply.status, reply.body)
            except Exception as exc:  # a bug in the emulator: say it, as a server would
                answer = Answer(500, {"error": f"emulator error: {type(exc).__name__}: {exc}"})
            payload = answer.payload()
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

    return Handler


class Server:
    """A running emulator on 127.0.0.1 (``port = 0`` picks a free one)."""

    def __init__(self, emulator: Emulator | None = None, port: int = 0):
        self.emulator = emulator or Emulator()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self.emulator))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def model_map(pairs: list[str], env: str | None = None) -> dict[str, str]:
    """``NAME=PATH`` pairs (``--model`` flags, then the comma-separated ``PREFTUNE_EMULATOR_MODELS``
    ``env``; a flag wins) as a mapping. ``*`` as NAME maps every name not mapped otherwise."""
    mapping: dict[str, str] = {}
    for pair in [p.strip() for p in (env or "").split(",") if p.strip()] + pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"{pair!r}: a model mapping is NAME=PATH, e.g. "
                             "accounts/fireworks/models/qwen3-8b=builtin:tiny")
        mapping[name.strip()] = path.strip()
    return mapping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preftune.testing.emulator",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--root", help="directory for saved states (default: a temporary one)")
    parser.add_argument("--lora-alpha", type=float, default=32.0,
                        help="LoRA alpha of the emulated trainers (the services fix their own)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="load the service's model NAME (e.g. accounts/fireworks/models/qwen3-8b) "
                        "from the local directory PATH or builtin:tiny; NAME '*' maps every other "
                        f"name; repeatable; also ${MODELS_ENV}='NAME=PATH,...'")
    args = parser.parse_args(argv)
    try:
        models = model_map(args.model, os.environ.get(MODELS_ENV))
    except ValueError as exc:
        parser.error(str(exc))
    server = Server(Emulator(args.root, args.lora_alpha, models=models), args.port)
    print(f"preftune emulator on {server.url} (Ctrl-C to stop)", flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        left = server.emulator.leftovers()
        print("left behind: " + (", ".join(left) if left else "nothing"), flush=True)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
