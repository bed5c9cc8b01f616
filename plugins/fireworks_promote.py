"""``[fireworks] output_model_id``: the final sampler checkpoint promoted to a Fireworks model.

As the cookbook's DPO recipe does after its final save (``TrainingCheckpoints.promote_latest``):
the trainer job's checkpoints are listed through the control plane (``list_checkpoints``, waiting
up to 90 s for a fresh save to be listed, as the cookbook waits), and the promotable row of this
run's final save is promoted with the SDK's ``promote_checkpoint(name=..., output_model_id=...,
base_model=...)``. The final save is a ``base`` sampler checkpoint, so a full fine-tune's is a
model on its own (a ``delta`` one is not promotable).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from preftune import TrainingError, log, mask_secrets
from preftune.plugins import remote

APPEAR_S = 90.0  # the cookbook's save_appear_timeout_s
MODEL_ID = re.compile(r"[a-z0-9-]{1,63}")  # the SDK's validate_output_model_id
SESSION_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # the trainer's suffix on sampler names


def check_model_id(value: str | None) -> str | None:
    """The option's validator: a model id as the SDK takes it (not a resource name)."""
    if value is not None and not MODEL_ID.fullmatch(value):
        raise ValueError("must be a Fireworks model id: 1-63 characters of a-z, 0-9 and - (the <id> "
                         "of accounts/<account>/models/<id>)")
    return value


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _matches(row: dict[str, Any], saved: Any) -> bool:
    """Is ``row`` the listing of sampler save ``saved`` (by its name, with or without the
    trainer's session suffix)?"""
    short = _short(str(row.get("name", "")))
    names = {saved.snapshot_name, _short(str(saved.path))}
    return bool(row.get("promotable")) and (short in names or SESSION_SUFFIX.sub("", short) in names)


def promotable_row(manager: Any, job_id: str, saved: Any, poll_s: float,
                   stop: threading.Event | None = None) -> dict[str, Any]:
    """The listed promotable row of ``saved`` on ``job_id``, polling up to :data:`APPEAR_S`
    (and no longer once ``stop`` is set)."""
    deadline = time.monotonic() + APPEAR_S
    stop = stop or threading.Event()
    while not stop.is_set():
        rows = manager.list_checkpoints(job_id)
        row = next((r for r in rows if _matches(r, saved)), None)
        if row is not None:
            return row
        if time.monotonic() > deadline:
            listed = ", ".join(f"{_short(str(r.get('name')))} ({r.get('checkpointType')}, promotable="
                               f"{r.get('promotable')})" for r in rows) or "none"
            raise RuntimeError(f"the sampler checkpoint {saved.snapshot_name} is not listed as "
                               f"promotable after {APPEAR_S:g} s; listed: {listed}")
        stop.wait(poll_s)
    raise RuntimeError("stopped waiting")


def sdk_reason(exc: BaseException) -> str:
    """An SDK error in one line: its ``ERROR:`` and ``Cause:`` lines where it has them (the
    rest is advice about its own tools), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines()]
    picked = [line.removeprefix("ERROR: ") for line in lines
              if line.startswith(("ERROR:", "Cause:"))]
    return mask_secrets("; ".join(picked)) if picked else remote.describe(exc)


def promote(service: remote.Service, manager: Any, job_id: str, saved: Any, model_id: str,
            base_model: str, poll_s: float) -> str:
    """Promote the final sampler save ``saved`` of ``job_id`` to the model ``model_id``; the
    model's name. A failure is a :class:`TrainingError` that says where the weights are and how
    to promote them by hand."""

    gave_up = threading.Event()  # once the run says the promotion failed, it never starts

    def call() -> Any:
        try:
            row = promotable_row(manager, job_id, saved, poll_s, gave_up)
            if gave_up.is_set():
                raise RuntimeError("stopped waiting")
            return manager.promote_checkpoint(name=row["name"], output_model_id=model_id,
                                              base_model=base_model)
        except (RuntimeError, ValueError) as exc:  # the SDK's own errors carry advice on lines 2+
            raise RuntimeError(sdk_reason(exc)) from None

    try:
        model = service.run(f"promoting the final weights to model {model_id}", call,
                            APPEAR_S + service.options.timeout_s)
    except remote.RemoteError as exc:
        gave_up.set()  # a listing answered after the wait ended must not promote behind the error
        raise TrainingError(_failed(exc, job_id, saved.snapshot_name, model_id, base_model)) from None
    name = str((model or {}).get("name") or model_id)
    log(f"fireworks: promoted the final weights to model {name}")
    return name


def _failed(exc: Exception, job_id: str, snapshot: str, model_id: str, base_model: str) -> str:
    return (f"{exc}. The final weights are saved on trainer job {job_id} as sampler checkpoint "
            f"{snapshot}; promote them by hand with the Fireworks SDK: FireworksClient(api_key)."
            f"promote_checkpoint(name='accounts/<account>/rlorTrainerJobs/{job_id}/checkpoints/"
            f"{snapshot}', output_model_id='{model_id}', base_model='{base_model}') (or the "
            f"cookbook's examples/tools/promote_checkpoint.py --job-id {job_id} --checkpoint-name "
            f"{snapshot} --base-model {base_model} --output-model-id {model_id})")
