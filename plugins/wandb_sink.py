"""The ``wandb`` sink: every step's metrics and each evaluation, with the optimizer step as the
x-axis; the resolved config with secrets masked; and the final summary. Nothing is logged for
runs that do not list ``wandb`` in ``sinks``. ``mode = "offline"`` (or ``WANDB_MODE=offline``)
needs no network or key; ``wandb sync`` uploads the run later."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from preftune import Config, ConfigError, hookimpl

SUMMARY_KEYS = ("steps", "tokens", "tokens_per_s", "train_s", "dropped_pairs", "truncated_pairs")


class WandbOptions(BaseModel):
    """Options of the ``[wandb]`` table."""

    model_config = ConfigDict(extra="forbid")
    project: str = Field("preftune", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); default yours.")
    run_name: str | None = Field(None, description="Run name; default chosen by W&B.")
    tags: list[str] = Field([], description="Run tags.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online, offline or disabled; default $WANDB_MODE or online."
    )
    dir: str | None = Field(None, description="Where W&B writes its files; default log_path.")


class WandbSink:
    def __init__(self, config: Config, options: WandbOptions):
        self.options = options
        self.dir = options.dir or config.log_path
        self.run: Any = None

    @hookimpl
    def preftune_run_start(self, config: Config, info: dict[str, Any], backend: Any) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("the wandb sink needs wandb: pip install 'preftune[wandb]'") from None

        Path(self.dir).mkdir(parents=True, exist_ok=True)
        # A resumed run continues the same W&B run: its id is kept beside the W&B files.
        id_file = Path(self.dir) / "wandb_run_id"
        resuming = bool(info.get("resume_step")) and id_file.exists()
        run_id = id_file.read_text().strip() if resuming else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        o = self.options
        self.run = wandb.init(project=o.project, entity=o.entity, name=o.run_name, tags=o.tags,
                              mode=o.mode, dir=self.dir, config=info.get("config", {}), id=run_id,
                              resume="allow" if resuming else None)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics}, step=step)

    @hookimpl
    def preftune_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics}, step=step)

    @hookimpl
    def preftune_run_end(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        for key in SUMMARY_KEYS:  # prefixed: the per-step metrics own the plain names
            if key in summary:
                self.run.summary[f"final_{key}"] = summary[key]
        for key, value in (summary.get("final_eval") or {}).items():
            self.run.summary[f"final_{key}"] = value
        self.run.summary["status"] = summary.get("status")
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
        self.run = None


@hookimpl
def register_sinks(register: Any) -> None:
    register("wandb", WandbSink, WandbOptions)
