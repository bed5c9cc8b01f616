"""The Fireworks control plane: the account, trainer jobs, deployments and hot-load (checkpoints
and models are in :mod:`checkpoint_routes`).

A trainer job's URL (``/training/v1/rlorTrainerJobs/{account}/{job}``) carries the session API
of :mod:`session_routes`; a model created there takes the job's base model, LoRA rank and
forward-only mode.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .exchange import Reply, Request

if TYPE_CHECKING:
    from .emulator import Emulator

ACCOUNT = "emulated"


def accounts(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    return {"accounts": [{"name": f"accounts/{ACCOUNT}"}]}


def _job_json(job_id: str, job: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}", "state": job["state"],
            "forwardOnly": job["forward_only"],
            "trainingConfig": {"baseModel": job["base_model"], "loraRank": job["lora_rank"],
                               "maxContextLength": job["max_context_length"]}}


def create_job(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    body = req.json()
    job_id = req.query.get("rlorTrainerJobId") or emu.new_id("job")
    if job_id in emu.jobs:
        raise Reply(409, f"trainer job {job_id} already exists")
    config = body.get("trainingConfig", {})
    if config.get("baseModel"):
        emu.local_model(config["baseModel"])  # a name it cannot load is refused now, not at first use
    emu.jobs[job_id] = {
        "base_model": config.get("baseModel"), "lora_rank": int(config.get("loraRank") or 0),
        "forward_only": bool(body.get("forwardOnly")),
        "max_context_length": int(config.get("maxContextLength") or 4096),
        "state": "JOB_STATE_CREATING" if emu.faults.never_ready else "JOB_STATE_RUNNING",
    }
    return _job_json(job_id, emu.jobs[job_id])


def _known_job(emu: Emulator, m: re.Match[str]) -> tuple[str, dict[str, Any]]:
    job = emu.jobs.get(m["job"])
    if job is None or job.get("deleted"):
        raise Reply(404, f"trainer job {m['job']} not found")
    return m["job"], job


def get_job(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    """The job; a deleted one is a tombstone in ``JOB_STATE_DELETED``, as the SDK reads the
    service (``trainer._TRAINER_TOMBSTONE_STATES``): "retained only for checkpoint recovery"."""
    job = emu.jobs.get(m["job"])
    if job is None:
        raise Reply(404, f"trainer job {m['job']} not found")
    return _job_json(m["job"], job)


def delete_job(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    """The job ends and stays a tombstone: listed by ``get_job`` in ``JOB_STATE_DELETED``, its id
    taken for good (creating it again is a 409, which the SDK reports as an archived job). The
    service keeps a deleted job's checkpoints 30 days for listing and promotion, but no source
    says another job can load its state (docs/backends.md, "Resuming"), so the emulator refuses
    that load (``session_routes._saved_state``)."""
    _, job = _known_job(emu, m)
    job["deleted"] = True
    job["state"] = "JOB_STATE_DELETED"
    return {}


def _deployment_json(deployment_id: str, dep: dict[str, Any]) -> dict[str, Any]:
    return {"name": f"accounts/{ACCOUNT}/deployments/{deployment_id}", "state": dep["state"],
            "baseModel": dep.get("base_model"), "minReplicaCount": dep["replicas"],
            "maxReplicaCount": dep["replicas"]}


def _deployment(emu: Emulator, deployment_id: str) -> dict[str, Any]:
    dep = emu.deployments.get(deployment_id)
    if dep is None or dep.get("deleted"):
        raise Reply(404, f"deployment {deployment_id} not found")
    return dep


def create_deployment(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    deployment_id = req.query.get("deploymentId") or emu.new_id("deployment")
    if deployment_id in emu.deployments and not emu.deployments[deployment_id].get("deleted"):
        raise Reply(409, f"deployment {deployment_id} already exists")
    body = req.json()
    emu.deployments[deployment_id] = {"state": "READY", "replicas": int(body.get("maxReplicaCount", 1)),
                                      "base_model": body.get("baseModel"), "created": True,
                                      "snapshot": None, "hot_loads": []}
    return _deployment_json(deployment_id, emu.deployments[deployment_id])


def get_deployment(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    return _deployment_json(m["deployment"], _deployment(emu, m["deployment"]))


def patch_deployment(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    dep = _deployment(emu, m["deployment"])
    body = req.json()
    if "maxReplicaCount" in body:
        dep["replicas"] = int(body["maxReplicaCount"])
    return _deployment_json(m["deployment"], dep)


def delete_deployment(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    _deployment(emu, m["deployment"])["deleted"] = True
    return {}


def _hot_load_target(emu: Emulator, req: Request) -> dict[str, Any]:
    name = req.headers.get("fireworks-deployment", "")
    return _deployment(emu, name.rsplit("/", 1)[-1])


def hot_load(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    """Load a snapshot the trainer saved for the sampler (it must exist)."""
    dep = _hot_load_target(emu, req)
    identity = req.json()["identity"]
    if not any(place.endswith("/" + identity) and kind == "sampler_weights"
               for place, kind in emu.saved):
        raise Reply(400, f"no sampler snapshot named {identity!r}")
    dep["snapshot"] = identity
    dep["hot_loads"].append(identity)
    return {}


def hot_load_status(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    dep = _hot_load_target(emu, req)
    return {"replicas": [{"current_snapshot_identity": dep["snapshot"], "readiness": True,
                          "loading_state": {"stage": "done"}}]}


def completions(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    return {"choices": [{"text": ""}]}


JOBS = r"/v1/accounts/(?P<account>[^/]+)/rlorTrainerJobs"
DEPLOYMENTS = r"/v1/accounts/(?P<account>[^/]+)/deployments"
ROUTES = [
    ("GET", r"/v1/accounts", accounts),
    ("POST", JOBS, create_job),
    ("GET", JOBS + r"/(?P<job>[^/:]+)", get_job),
    ("DELETE", JOBS + r"/(?P<job>[^/:]+)", delete_job),
    ("POST", DEPLOYMENTS, create_deployment),
    ("GET", DEPLOYMENTS + r"/(?P<deployment>[^/]+)", get_deployment),
    ("PATCH", DEPLOYMENTS + r"/(?P<deployment>[^/]+)", patch_deployment),
    ("DELETE", DEPLOYMENTS + r"/(?P<deployment>[^/]+)", delete_deployment),
    ("POST", r"/hot_load/v1/models/hot_load", hot_load),
    ("GET", r"/hot_load/v1/models/hot_load", hot_load_status),
    ("POST", r"/inference/v1/completions", completions),
]
