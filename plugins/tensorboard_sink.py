"""The ``tensorboard`` sink: each step's metrics (``train/<name>``) and each evaluation's
(``eval/<name>``) as TensorBoard scalars against the optimizer step, and the config with secrets
masked as text. Written with ``tensorboardX`` (no TensorFlow or TensorBoard server needed);
``tensorboard --logdir log_path/tensorboard`` shows them. A resumed run drops the events the
interrupted one wrote after its checkpoint (``purge_step``); a new run in a used directory, the
earlier run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from preftune import Config, ConfigError, hookimpl


class TensorBoardOptions(BaseModel):
    """Options of the ``[tensorboard]`` table."""

    model_config = ConfigDict(extra="forbid")
    directory: str | None = Field(None, description="Where the event files go; default log_path/tensorboard.")


def writer_class() -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError("the tensorboard sink needs tensorboardX: "
                          "pip install 'preftune[tensorboard]'") from None
    return SummaryWriter


class TensorBoardSink:
    @staticmethod
    def check(config: Config, options: TensorBoardOptions) -> None:
        writer_class()  # missing: said before anything loads

    @staticmethod
    def outputs(config: Config, options: TensorBoardOptions) -> list[tuple[str, str, str]]:
        """The event directory, when it is outside log_path (checked against the run's inputs)."""
        if options.directory is None:
            return []
        return [(options.directory, "the tensorboard sink's event files", "tensorboard.directory")]

    def __init__(self, config: Config, options: TensorBoardOptions):
        self.directory = Path(options.directory or Path(config.log_path) / "tensorboard")
        self.writer: Any = None

    @hookimpl
    def preftune_run_start(self, config: Config, info: dict[str, Any], backend: Any) -> None:
        resume = info.get("resume_step", 0)
        # TensorBoard hides the events earlier files hold from purge_step on: on resume, what
        # the interrupted run logged after its checkpoint; in a new run, an earlier run's. The
        # suffix keeps a session that starts within the second of the last one (tensorboardX
        # names files by the second) from overwriting its file, and sorts it after that one.
        self.writer = writer_class()(str(self.directory), purge_step=resume + 1 if resume else 0,
                                     filename_suffix=f".step-{resume:08d}")
        text = json.dumps(info["config"], indent=2, sort_keys=True)  # secrets masked already
        self.writer.add_text("config", f"```\n{text}\n```", global_step=resume)

    def _scalars(self, prefix: str, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), global_step=step)

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._scalars("train", step, metrics)

    @hookimpl
    def preftune_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._scalars("eval", step, metrics)
        self.writer.flush()

    @hookimpl
    def preftune_log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """The samples as one Markdown table (TensorBoard's text tab renders Markdown)."""
        self.writer.add_text("eval/samples", samples_markdown(samples), step)
        self.writer.flush()

    @hookimpl
    def preftune_run_end(self, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """``eval_samples`` rows as a Markdown table: prompt, completion, chosen, each cell on one
    line (newlines as ``<br>``, pipes escaped)."""
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    columns = ("source", "prompt", "completion", "chosen")
    rows = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    rows += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in samples]
    return "\n".join(rows)


@hookimpl
def register_sinks(register: Any) -> None:
    register("tensorboard", TensorBoardSink, TensorBoardOptions)
