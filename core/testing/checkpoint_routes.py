"""The Fireworks control plane's checkpoints and models: listing a trainer job's saved
checkpoints, promoting one to a model, and the models (and operations) that makes.

As ``fireworks.training.sdk`` reads them (``FireworksClient.list_checkpoints`` and
``promote_checkpoint``, fireworks-ai 1.2.30) and the cookbook's ``TrainingCheckpoints`` uses
them: a row is ``{name, createTime, updateTime, checkpointType, promotable}``, oldest first. A
resumable save (``save_state``) is a ``CHECKPOINT_TYPE_TRAINING`` (``_TRAINING_LORA``) row that
cannot be promoted; a sampler save is an ``INFERENCE_*`` row that can, except a full fine-tune's
delta (``checkpoint_type = "delta"``, stored ``arc_v2``-compressed), which is no model on its own.
Listing and promoting work on a deleted job too, as the service keeps its record.

Models are read as the ``fireworks`` client's ``models`` resource reads them (``get``, ``list``
paged by ``pageSize`` / ``pageToken``, ``delete``): the account's promoted models, and the base
models the emulator was told to load (``--model NAME=PATH``), whose ``baseModelDetails.moe`` the
training SDK's ``FireworksClient.model_is_moe`` reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .exchange import Reply, Request
from .fireworks_routes import ACCOUNT
from .session_routes import now_rfc3339

if TYPE_CHECKING:
    from .emulator import Emulator

EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")  # transformers' config keys
MODEL_ID = re.compile(r"[a-z0-9-]{1,63}")  # the SDK's validate_output_model_id
SAMPLER_TYPES = {  # (checkpoint_type the SDK sends, LoRA) -> (checkpointType, promotable)
    ("base", False): ("CHECKPOINT_TYPE_INFERENCE_BASE", True),
    ("base", True): ("CHECKPOINT_TYPE_INFERENCE_LORA", True),
    ("merged_base", True): ("CHECKPOINT_TYPE_INFERENCE_BASE", True),
    ("delta", False): ("CHECKPOINT_TYPE_INFERENCE_ARC_V2", False),
}


def checkpoint_type(entry: dict[str, Any]) -> tuple[str, bool]:
    """``(checkpointType, promotable)`` of a saved entry, as the service lists it."""
    lora = entry["rank"] > 0
    if entry["kind"] == "weights":
        return ("CHECKPOINT_TYPE_TRAINING_LORA" if lora else "CHECKPOINT_TYPE_TRAINING"), False
    return SAMPLER_TYPES.get((entry["checkpoint_type"], lora), ("CHECKPOINT_TYPE_INFERENCE_BASE", True))


def _row(account: str, entry: dict[str, Any]) -> dict[str, Any]:
    kind, promotable = checkpoint_type(entry)
    return {"name": f"accounts/{account}/rlorTrainerJobs/{entry['job']}/checkpoints/{entry['name']}",
            "createTime": entry["created"], "updateTime": entry["created"], "checkpointType": kind,
            "promotable": promotable}


def _job(emu: Emulator, job_id: str) -> dict[str, Any]:
    """A trainer job the service has a record of (deleted ones too)."""
    job = emu.jobs.get(job_id)
    if job is None:
        raise Reply(404, f"trainer job {job_id} not found")
    return job


def _entries(emu: Emulator, job_id: str) -> list[dict[str, Any]]:
    """The job's saved checkpoints, oldest first."""
    entries = [e for e in emu.saved.values() if e.get("job") == job_id]
    return sorted(entries, key=lambda e: e["created"])


def list_checkpoints(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    _job(emu, m["job"])
    return {"checkpoints": [_row(m["account"], e) for e in _entries(emu, m["job"])], "nextPageToken": ""}


def _promotable(emu: Emulator, job_id: str, checkpoint: str) -> dict[str, Any]:
    """The saved entry ``checkpoint`` of ``job_id`` that can be promoted; a 404 when the job
    has no checkpoint of that name, a 400 when it has only ones that cannot be."""
    named = [e for e in _entries(emu, job_id) if e["name"] == checkpoint]
    if not named:
        raise Reply(404, f"checkpoint {checkpoint!r} not found on trainer job {job_id}")
    for entry in named:
        if checkpoint_type(entry)[1]:
            return entry
    kinds = ", ".join(checkpoint_type(e)[0] for e in named)
    raise Reply(400, f"checkpoint {checkpoint!r} of trainer job {job_id} is not promotable ({kinds}): "
                "promote a sampler checkpoint (save_weights_for_sampler, checkpoint_type 'base')")


def _output_model(account: str, body: dict[str, Any]) -> str:
    name = str(body.get("output_model") or "")
    prefix = f"accounts/{account}/models/"
    if not name.startswith(prefix) or not MODEL_ID.fullmatch(name.removeprefix(prefix)):
        raise Reply(400, f"output_model {name!r} must be {prefix}<id>, the id 1-63 of a-z, 0-9 and -")
    return name


def _model_json(name: str, entry: dict[str, Any], base_model: str) -> dict[str, Any]:
    model = {"name": name, "state": "READY", "createTime": now_rfc3339(), "baseModel": base_model,
             "kind": "HF_PEFT_ADDON" if entry["rank"] > 0 else "HF_BASE_MODEL"}
    if entry["rank"] > 0:
        model["peftDetails"] = {"baseModel": base_model, "r": entry["rank"],
                                "targetModules": entry["target_modules"]}
    return model


def promote(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    """``POST /v1/accounts/{a}/checkpoints/{ckpt}:promote`` with the SDK's body
    ``{output_model, trainer_job_id, base_model, async_promotion}``: the checkpoint becomes the
    model ``output_model``. With ``async_promotion`` the answer is an operation, done at once."""
    body = req.json()
    job_id = str(body.get("trainer_job_id") or "").rsplit("/", 1)[-1]
    if not job_id:
        raise Reply(400, "trainer_job_id is required (accounts/<account>/rlorTrainerJobs/<job>)")
    job = _job(emu, job_id)
    entry = _promotable(emu, job_id, m["checkpoint"])
    if body.get("base_model") != job["base_model"]:
        raise Reply(400, f"base_model {body.get('base_model')!r} does not match trainer job {job_id}'s "
                    f"{job['base_model']!r}")
    name = _output_model(m["account"], body)
    if name in emu.promoted:
        raise Reply(409, f"model {name} already exists")
    model = _model_json(name, entry, job["base_model"])
    emu.promoted[name] = {"model": model, "checkpoint": entry}
    if not body.get("async_promotion"):
        return {"model": model}
    operation = {"name": f"accounts/{m['account']}/operations/{emu.new_id('op')}", "done": True,
                 "metadata": {"statusMessage": "Checkpoint promoted"}, "response": model}
    emu.operations[operation["name"]] = operation
    return {"operation": operation}


def _moe(local: str) -> bool:
    """Whether the local model ``local`` (a directory or ``builtin:tiny``) is a mixture of
    experts, read from its ``config.json`` as transformers names the expert count."""
    config = Path(local) / "config.json"
    if not config.is_file():
        return False  # builtin:tiny, a dense Qwen3
    values = json.loads(config.read_text())
    return any(int(values.get(key) or 0) > 0 for key in EXPERT_COUNTS)


def _base_model(emu: Emulator, name: str) -> dict[str, Any] | None:
    """The record of a base model the emulator loads under the service's ``name``: one mapped by
    name, or by ``*`` outside the emulated account (whose models are the promoted ones)."""
    local = emu.model_map.get(name)
    if local is None and not name.startswith(f"accounts/{ACCOUNT}/"):
        local = emu.model_map.get("*")
    if local is None:
        return None
    return {"name": name, "state": "READY", "kind": "HF_BASE_MODEL", "tunable": True,
            "baseModelDetails": {"checkpointFormat": "HUGGINGFACE", "moe": _moe(local)}}


def get_model(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    name = f"accounts/{m['account']}/models/{m['model']}"
    if name in emu.promoted:
        return dict(emu.promoted[name]["model"])
    base = _base_model(emu, name)
    if base is None:
        raise Reply(404, f"model {name} not found")
    return base


def list_models(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    """The account's promoted models by name, ``pageSize`` at a time (the service's default 50,
    at most 200); ``nextPageToken`` is the next offset, empty on the last page."""
    prefix = f"accounts/{m['account']}/models/"
    names = sorted(n for n in emu.promoted if n.startswith(prefix))
    try:
        size = min(int(req.query.get("pageSize") or 50), 200)
        start = int(req.query.get("pageToken") or 0)
    except ValueError:
        raise Reply(400, "pageSize and pageToken must be the numbers this service hands out") from None
    page = names[start:start + size]
    more = start + size < len(names)
    return {"models": [dict(emu.promoted[n]["model"]) for n in page],
            "nextPageToken": str(start + size) if more else "", "totalSize": len(names)}


def delete_model(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    """A promoted model is deleted (its id may be promoted to again); base models are not."""
    name = f"accounts/{m['account']}/models/{m['model']}"
    if emu.promoted.pop(name, None) is None:
        raise Reply(404, f"model {name} not found")
    return {}


def get_operation(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    name = f"accounts/{m['account']}/operations/{m['operation']}"
    if name not in emu.operations:
        raise Reply(404, f"operation {name} not found")
    return emu.operations[name]


ACCOUNTS = r"/v1/accounts/(?P<account>[^/]+)"
ROUTES = [
    ("GET", ACCOUNTS + r"/rlorTrainerJobs/(?P<job>[^/:]+)/checkpoints", list_checkpoints),
    ("POST", ACCOUNTS + r"/checkpoints/(?P<checkpoint>[^/:]+):promote", promote),
    ("GET", ACCOUNTS + r"/models", list_models),
    ("GET", ACCOUNTS + r"/models/(?P<model>[^/:]+)", get_model),
    ("DELETE", ACCOUNTS + r"/models/(?P<model>[^/:]+)", delete_model),
    ("GET", ACCOUNTS + r"/operations/(?P<operation>[^/:]+)", get_operation),
]
