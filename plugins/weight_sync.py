"""The ``weight_sync`` sink: push the policy's weights to a deployment during and after training.

The backend does the pushing (``publish_weights``): the local backend writes versioned snapshots
with a manifest and switches a ``current`` pointer atomically; a remote backend saves weights for
its sampler and hot-loads the deployment. As in the cookbook, DPO syncs nothing during training by
default (``weight_sync_interval = 0``) and once at the end. A backend that publishes to a service
deployment (``check_deployment``) has it checked once the backend is built, before the reference
pass and the first step: a missing or failed deployment stops the run before any work (one still
starting is said, and training starts: the first hot-load waits for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from preftune import Config, ConfigError, TrainingError, hookimpl

KEY = "weight_sync.deployment_id"


class WeightSyncOptions(BaseModel):
    """Options of the ``[weight_sync]`` table."""

    model_config = ConfigDict(extra="forbid")
    weight_sync_interval: int = Field(
        0, ge=0, description="Sync every N optimizer steps; 0 = never during training."
    )
    on_end: bool = Field(True, description="Sync after the last step.")
    deployment_id: str = Field("preftune", description="The deployment to update.")
    directory: str | None = Field(
        None, description="Local backend: snapshot directory; default log_path/deployments/<deployment_id>."
    )
    keep_snapshots: int = Field(3, ge=1, description="Snapshots to keep (the current one included).")


class WeightSyncSink:
    # runs on every rank of a torchrun job (other sinks run on the main rank only): under FSDP
    # every rank takes part in gathering the weights the main rank publishes
    every_rank = True

    @staticmethod
    def outputs(config: Config, options: WeightSyncOptions) -> list[tuple[str, str, str]]:
        """Where the local backend writes snapshots (checked against the run's inputs)."""
        if options.directory is None:
            return []  # log_path/deployments, which the core knows
        return [(options.directory, "the weight_sync sink's snapshots, pruned", "weight_sync.directory")]

    def __init__(self, config: Config, options: WeightSyncOptions):
        self.options = options
        default = Path(config.log_path) / "deployments" / options.deployment_id
        self.directory = options.directory or str(default)
        self.backend: Any = None
        self.synced_step = -1
        self.manifests: list[dict[str, Any]] = []

    @hookimpl
    def preftune_backend_ready(self, config: Config, backend: Any) -> None:
        """Before the reference pass and any step: the backend can publish, and the deployment
        it would publish to is there and ready (for a backend with ``check_deployment``)."""
        if not callable(getattr(backend, "publish_weights", None)):
            raise ConfigError(f"backend {config.backend!r} cannot publish weights (no publish_weights)")
        self.backend = backend
        check = getattr(backend, "check_deployment", None)
        if callable(check):
            check_deployment(config, check, self.options.deployment_id)

    def sync(self, step: int) -> None:
        manifest = self.backend.publish_weights(
            snapshot=f"step-{step:08d}", step=step, deployment_id=self.options.deployment_id,
            directory=self.directory, keep=self.options.keep_snapshots,
        )
        self.synced_step = step
        self.manifests.append(manifest)

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        interval = self.options.weight_sync_interval
        if interval and step % interval == 0:
            self.sync(step)

    @hookimpl
    def preftune_run_end(self, summary: dict[str, Any]) -> None:
        done = summary.get("status") == "completed"
        if done and self.options.on_end and self.synced_step != summary["steps"]:
            self.sync(summary["steps"])


def check_deployment(config: Config, check: Any, deployment_id: str) -> None:
    """``check(deployment_id)`` says what is wrong with the deployment (None: nothing); a
    problem is a :class:`ConfigError`, a fault on the way a :class:`TrainingError`, each naming
    ``weight_sync.deployment_id``."""
    origin = config.origin(KEY)
    where = (f"{origin}: " if origin else "") + f"field {KEY!r} = {deployment_id!r}"
    try:
        problem = check(deployment_id)
    except TrainingError as exc:
        raise TrainingError(f"{where}: could not check the deployment before training: {exc}") from None
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")


@hookimpl
def register_sinks(register: Any) -> None:
    register("weight_sync", WeightSyncSink, WeightSyncOptions)
