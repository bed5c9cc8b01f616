"""The ``wandb`` sink: every step's metrics and each evaluation, with the optimizer step as the
x-axis; with ``eval_samples``, a table of the samples at each evaluation; the resolved config
with secrets masked; and the final summary. Nothing is logged for
runs that do not list ``wandb`` in ``sinks``. ``mode = "offline"`` (or ``WANDB_MODE=offline``)
needs no network or key; ``wandb sync`` uploads the run later.

A server that cannot be reached never holds the run up: start-up waits ``init_timeout`` seconds
(after W&B's own look-up of the user name, about 10 s at most), then the run goes on offline and
says so (nothing is lost: ``wandb sync`` uploads it later); the end waits at most
``finish_timeout`` seconds for uploads (what is left stays in the local files, for ``wandb
sync``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

from preftune import Config, ConfigError, hookimpl, log, mask_secrets
from preftune.samples import sample_table

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
    init_timeout: float = Field(
        30.0, gt=0, description="Seconds to wait for the W&B server at start; then the run goes on "
        "offline and says so (`wandb sync` uploads it later)."
    )
    finish_timeout: float = Field(
        120.0, ge=0, description="Seconds to wait at the end for uploads to finish; 0 = no limit. "
        "What is not uploaded by then stays in the local files (`wandb sync`)."
    )


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
        settings = wandb.Settings(init_timeout=o.init_timeout, finish_timeout=o.finish_timeout,
                                  **server_without_password())
        args = dict(project=o.project, entity=o.entity, name=o.run_name, tags=o.tags, dir=self.dir,
                    config=info.get("config", {}), id=run_id, resume="allow" if resuming else None,
                    settings=settings)
        try:
            self.run = wandb.init(mode=o.mode, **args)
        except wandb.errors.CommError as exc:  # no server within init_timeout, or it refused us
            reason = mask_secrets(str(exc).splitlines()[0])  # it may quote WANDB_BASE_URL
            log(f"wandb: cannot start the run on the W&B server ({reason}); logging offline under "
                f"{self.dir} instead: upload it later with `wandb sync`")
            wandb.teardown()  # the service still holds the failed run's id, which we keep
            self.run = wandb.init(mode="offline", **args)
        except wandb.errors.Error as exc:  # no API key, a bad entity or project, ...
            text = str(exc).strip()
            reason = mask_secrets(text.splitlines()[0]) if text else type(exc).__name__
            raise ConfigError(f"wandb: {reason} (log in with `wandb login` or set WANDB_API_KEY; "
                              "or log without a server: [wandb] mode = 'offline')") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics}, step=step)

    @hookimpl
    def preftune_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics}, step=step)

    @hookimpl
    def preftune_log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        import wandb

        columns, rows = sample_table(samples)
        table = wandb.Table(columns=columns, data=rows)
        self.run.log({"step": step, "eval_samples": table}, step=step)

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


def server_without_password() -> dict[str, str]:
    """``base_url`` for W&B's settings when ``WANDB_BASE_URL`` holds a user name and password:
    the URL without them. W&B authenticates with its API key (``api:<key>``) and would only
    write the password into its debug logs under ``log_path``."""
    url = os.environ.get("WANDB_BASE_URL", "")
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return {}
    log(f"wandb: WANDB_BASE_URL holds a user name or password ({mask_secrets(url)}); W&B signs in "
        "with its API key, so they are not passed on (nor written to W&B's logs)")
    return {"base_url": urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))}


@hookimpl
def register_sinks(register: Any) -> None:
    register("wandb", WandbSink, WandbOptions)
