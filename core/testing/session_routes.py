"""The session API both SDKs speak (``/api/v1/...``): sessions, models, futures and the verbs.

Tinker speaks it at the service's root; the Fireworks SDK speaks the same paths under each trainer
job's URL (``/training/v1/rlorTrainerJobs/{account}/{job}``, see :mod:`fireworks_routes`).
Forward/backward is protobuf for Tinker and JSON for Fireworks; every other call is JSON. Results
are computed when the request arrives and handed out through ``retrieve_future``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import tinker_wire
from .exchange import Answer, Failed, Reply, Request
from .trainer import Adam, Datum, Trainer

if TYPE_CHECKING:
    from .emulator import Emulator

PROTO = "application/x-protobuf"


def client_config(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    return {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": False,
            "use_pyqwest_transport": False}


def dynamic_config(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    return {"refresh_interval_sec": 3600}


def create_session(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    session_id = emu.new_id("session")
    emu.sessions[session_id] = {"created": True, "job": m.groupdict().get("job")}
    return {"type": "create_session", "session_id": session_id}


def heartbeat(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    return {"type": "session_heartbeat"}


def finish_session(emu: Emulator, req: Request, m: re.Match[str]) -> Any:
    session = emu.sessions.get(m["session"])
    if session is not None:
        session["finished"] = req.json().get("reason", {}).get("type", "success")
    return None


def _model(emu: Emulator, model_id: str) -> dict[str, Any]:
    model = emu.models.get(model_id)
    if model is None:
        raise Reply(404, f"unknown model {model_id!r}")
    if model["job"] and emu.jobs[model["job"]].get("deleted"):
        raise Reply(404, f"trainer job {model['job']} was deleted")
    steps = emu.faults.die_after_steps
    if steps is not None and model["steps"] >= steps:
        raise Failed(f"the trainer of {model_id} died (injected fault)")
    return model


def _job(emu: Emulator, m: re.Match[str]) -> dict[str, Any] | None:
    job = m.groupdict().get("job")
    return emu.jobs.get(job) if job else None


def create_model(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    body = req.json()
    job = _job(emu, m) or {}
    if job.get("deleted"):
        raise Reply(404, f"trainer job {m['job']} was deleted")
    lora = body.get("lora_config") or {}
    rank = int(lora.get("rank") or 0) or int(job.get("lora_rank") or 0)
    model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
    base_only = bool(body.get("base_only"))
    forward_only = base_only or bool(job.get("forward_only"))
    with emu.lock:
        trainer = emu.trainer(job.get("base_model") or body["base_model"],
                              lora_rank=0 if base_only else rank,
                              lora_alpha=float(lora.get("alpha") or emu.lora_alpha),
                              seed=int(lora.get("seed") or 0), forward_only=forward_only,
                              train_unembed=bool(lora.get("train_unembed", True)))
    emu.models[model_id] = {"trainer": trainer, "steps": 0, "rank": rank, "base_only": base_only,
                            "base_model": body["base_model"], "session": body["session_id"],
                            "job": m.groupdict().get("job"), "alpha": trainer.lora_alpha}
    return emu.future(Answer(body={"type": "create_model", "model_id": model_id}))


def get_info(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    model_id = req.json()["model_id"]
    model = _model(emu, model_id)
    return {"type": "get_info", "model_id": model_id, "is_lora": model["rank"] > 0,
            "lora_rank": model["rank"] or None, "model_name": model["base_model"],
            "model_data": {"model_name": model["base_model"], "tokenizer_id": model["base_model"]}}


def _forward_backward(emu: Emulator, model_id: str, loss_fn: str, forward_only: bool,
                      datums: list[Datum]) -> tuple[list[list[float]], dict[str, float]]:
    if loss_fn != "cross_entropy":
        raise Reply(400, f"loss_fn {loss_fn!r} is not emulated (only cross_entropy)")
    model = _model(emu, model_id)
    trainer: Trainer = model["trainer"]
    with emu.lock:
        if forward_only:
            logprobs = trainer.forward(datums, base_only=model["base_only"])
            loss = -sum(w * lp for d, row in zip(datums, logprobs) for w, lp in zip(d.weights, row))
        else:
            logprobs, loss = trainer.forward_backward(datums)
    return logprobs, {"loss:sum": loss}


def forward_backward_proto(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    try:
        model_id, loss_fn, forward_only, datums = tinker_wire.decode_forward_backward(req.body)
    except (ValueError, KeyError) as exc:
        raise Reply(400, f"bad forward_backward request: {exc}") from None
    logprobs, metrics = _forward_backward(emu, model_id, loss_fn, forward_only, datums)
    return emu.future(Answer(body=tinker_wire.encode_output(logprobs, metrics), content_type=PROTO))


def _tensor(value: Any) -> list[Any]:
    return value["data"] if isinstance(value, dict) else list(value)


def _json_datums(body: dict[str, Any]) -> tuple[str, list[Datum]]:
    spec = body.get("forward_backward_input") or body.get("forward_input") or {}
    datums = []
    for d in spec.get("data", []):
        tokens = [t for chunk in d["model_input"]["chunks"] for t in chunk["tokens"]]
        inputs = d["loss_fn_inputs"]
        targets = [int(t) for t in _tensor(inputs["target_tokens"])]
        weights = [float(w) for w in _tensor(inputs.get("weights", [0.0] * len(targets)))]
        datums.append(Datum(tokens, targets, weights))
    return spec.get("loss_fn", "cross_entropy"), datums


def _json_output(logprobs: list[list[float]], metrics: dict[str, float]) -> dict[str, Any]:
    outputs = [{"logprobs": {"data": row, "dtype": "float32", "shape": [len(row)]}} for row in logprobs]
    return {"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": outputs, "metrics": metrics}


def forward_json(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    body = req.json()
    loss_fn, datums = _json_datums(body)
    logprobs, metrics = _forward_backward(emu, body["model_id"], loss_fn, True, datums)
    return emu.future(Answer(body=_json_output(logprobs, metrics)))


def forward_backward(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    if req.headers.get("content-type", "").startswith(PROTO):
        return forward_backward_proto(emu, req, m)
    body = req.json()
    loss_fn, datums = _json_datums(body)
    logprobs, metrics = _forward_backward(emu, body["model_id"], loss_fn, False, datums)
    return emu.future(Answer(body=_json_output(logprobs, metrics)))


def optim_step(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    body = req.json()
    model = _model(emu, body["model_id"])
    params = body.get("adam_params") or body.get("optim_params") or {}
    adam = Adam(**{k: float(v) for k, v in params.items() if k in Adam.__dataclass_fields__})
    with emu.lock:
        try:
            metrics = model["trainer"].optim_step(adam)
        except ArithmeticError as exc:
            raise Failed(str(exc), "user") from None
    model["steps"] += 1
    model["adam"] = adam
    return emu.future(Answer(body={"type": "optim_step", "metrics": metrics}))


def _state_dir(emu: Emulator, model_id: str, kind: str, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model_id}/{kind}/{name}")
    return emu.root / "states" / safe


def save_weights(emu: Emulator, req: Request, m: re.Match[str], kind: str = "weights") -> dict[str, str]:
    body = req.json()
    model_id = body["model_id"]
    model = _model(emu, model_id)
    name = body.get("path") or f"step-{model['steps']}"
    directory = _state_dir(emu, model_id, kind, name)
    with emu.lock:
        model["trainer"].save(directory, optimizer=kind == "weights")
    path = name if model["job"] else f"tinker://{model_id}/{kind}/{name}"
    emu.saved[(_saved_key(model["job"], path), kind)] = {
        "model_id": model_id, "rank": model["rank"], "base_model": model["base_model"],
        "alpha": model["alpha"], "dir": directory, "kind": kind, "job": model["job"], "name": path,
        "train_unembed": model["trainer"].train_unembed, "created": now_rfc3339(),
        "target_modules": model["trainer"].target_modules(),
        "checkpoint_type": str(body.get("checkpoint_type") or "base")}
    kind_type = "save_weights" if kind == "weights" else "save_weights_for_sampler"
    return emu.future(Answer(body={"type": kind_type, "path": path}))


def save_sampler(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    return save_weights(emu, req, m, kind="sampler_weights")


def now_rfc3339() -> str:
    """The time now as the service writes it (RFC3339, UTC, microseconds), e.g.
    ``2026-12-06T21:15:00.123456Z``: the cookbook compares such strings with its own clock's."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _saved_key(job: str | None, path: str) -> str:
    """Where a saved state is found: a Tinker URI is global, a Fireworks name is the trainer
    job's own (``cross_job://{job}/{name}`` names another job's). A resumable state and sampler
    weights saved under one name are two entries (``emu.saved`` is keyed by place and kind)."""
    if path.startswith("cross_job://"):
        return path.removeprefix("cross_job://")
    return f"{job}/{path}" if job else path


def _saved_state(emu: Emulator, job: str | None, path: str) -> dict[str, Any]:
    """What ``load_weights`` loads from ``path``: a resumable state; with Tinker, whose paths
    name their kind, sampler weights too. A Fireworks trainer refuses a sampler checkpoint."""
    key = _saved_key(job, path)
    saved = emu.saved.get((key, "weights"))
    if saved is None and not job:
        saved = emu.saved.get((key, "sampler_weights"))
    if saved is not None and saved.get("job") and emu.jobs.get(saved["job"], {}).get("deleted"):
        raise Failed(f"no saved state at {path}: trainer job {saved['job']} that saved it was deleted "
                     "(its checkpoints stay listed and promotable, not loadable)", "user")
    if saved is None:
        sampler = (key, "sampler_weights") in emu.saved
        raise Failed(f"no saved state at {path}" + (" (a sampler checkpoint cannot be loaded into a "
                                                    "trainer: save it with save_state)" if sampler else ""),
                     "user")
    return saved


def load_weights(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    body = req.json()
    saved = _saved_state(emu, m.groupdict().get("job"), body["path"])
    if body.get("model_id"):
        model_id = body["model_id"]
    else:  # a new training client from saved state
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
        with emu.lock:
            trainer = emu.trainer(saved["base_model"], lora_rank=saved["rank"], lora_alpha=saved["alpha"],
                                  train_unembed=saved["train_unembed"])
        emu.models[model_id] = {"trainer": trainer, "steps": 0, "rank": saved["rank"],
                                "base_only": False, "base_model": saved["base_model"],
                                "session": body["session_id"], "job": m.groupdict().get("job"),
                                "alpha": saved["alpha"]}
    model = _model(emu, model_id)
    with emu.lock:
        model["trainer"].load(saved["dir"], optimizer=bool(body.get("optimizer")), adam=model.get("adam"))
    return emu.future(Answer(body={"type": "load_weights", "path": body["path"], "model_id": model_id}))


def retrieve_future(emu: Emulator, req: Request, m: re.Match[str]) -> Any:
    request_id = req.json()["request_id"]
    answer = emu.futures.get(request_id)
    if answer is None:
        raise Reply(404, f"unknown future {request_id!r}")
    if emu.polls.get(request_id, 0) < emu.faults.pending:  # still queued, as a busy service says
        emu.polls[request_id] = emu.polls.get(request_id, 0) + 1
        return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
    return answer


def telemetry(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    """Both SDKs validate the answer as ``TelemetryResponse`` (``status: Literal["accepted"]``);
    anything else logs a traceback per batch and holds each session's close ~30 s."""
    return {"status": "accepted"}


def healthz(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    job = _job(emu, m)
    if job is not None and (job.get("deleted") or job["state"] != "JOB_STATE_RUNNING"):
        raise Reply(503, "trainer not ready")
    return {"status": "ok"}


def unload_model(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    model_id = req.json()["model_id"]
    emu.models.pop(model_id, None)
    return emu.future(Answer(body={"type": "unload_model", "model_id": model_id}))


JOB = r"(?:/training/v1/rlorTrainerJobs/(?P<account>[^/]+)/(?P<job>[^/]+))?"
API = [
    ("POST", "/api/v1/client/config", client_config),
    ("POST", "/api/v1/client/dynamic_config", dynamic_config),
    ("POST", "/api/v1/create_session", create_session),
    ("POST", "/api/v1/session_heartbeat", heartbeat),
    ("POST", "/api/v1/sessions/(?P<session>[^/]+)/finish", finish_session),
    ("POST", "/api/v1/create_model", create_model),
    ("POST", "/api/v1/get_info", get_info),
    ("POST", "/api/v1/forward", forward_json),
    ("POST", "/api/v1/forward_backward", forward_backward),
    ("POST", "/api/v1/optim_step", optim_step),
    ("POST", "/api/v1/save_weights", save_weights),
    ("POST", "/api/v1/save_weights_for_sampler", save_sampler),
    ("POST", "/api/v1/load_weights", load_weights),
    ("POST", "/api/v1/unload_model", unload_model),
    ("POST", "/api/v1/retrieve_future", retrieve_future),
    ("POST", "/api/v1/telemetry", telemetry),
    ("GET", "/api/v1/healthz", healthz),
]
ROUTES = [(method, JOB + path, route) for method, path, route in API]
