"""The ``console`` sink: a progress bar over optimizer steps (on a terminal only), a line every
``interval`` steps, each evaluation, and a summary at the end. Everything goes to stderr."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from preftune import Config, hookimpl

INFO_KEYS = ("train_pairs", "eval_pairs", "total_steps", "resume_step", "dropped_pairs",
             "truncated_pairs")
LINE_KEYS = ("loss", "margin", "accuracy", "grad_norm", "lr", "tokens_per_s")
SAMPLE_WIDTH = 100  # characters of a sample shown on the console


class ConsoleOptions(BaseModel):
    """Options of the ``[console]`` table."""

    model_config = ConfigDict(extra="forbid")
    interval: int = Field(10, ge=0, description="Print a metrics line every N steps; 0 = never.")
    progress: bool = Field(True, description="Show a progress bar when stderr is a terminal (never in "
                           "a pipe or a file, where its redraws would be noise).")


def fmt(metrics: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    items = [(k, metrics[k]) for k in (keys or metrics) if k in metrics]
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


class ConsoleSink:
    def __init__(self, options: ConsoleOptions):
        self.options = options
        self.bar: Any = None

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    @hookimpl
    def preftune_run_start(self, config: Config, info: dict[str, Any], backend: Any) -> None:
        self.write(f"training {config.loss} on {config.base_model}: {fmt(info, INFO_KEYS)}")
        self.bar = tqdm(total=info["total_steps"], desc="train", unit="step", file=sys.stderr,
                        disable=None if self.options.progress else True,  # None: only on a tty
                        dynamic_ncols=True)

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)
        if self.options.interval and step % self.options.interval == 0:
            self.write(f"step {step}: {fmt(metrics, LINE_KEYS)}")

    @hookimpl
    def preftune_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.write(f"eval @ step {step}: {fmt(metrics)}")

    @hookimpl
    def preftune_log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        if samples:  # the first one, on one line; all of them are in samples.jsonl
            first = repr(samples[0]["completion"])  # quoted, newlines as \n: one line
            first = first if len(first) <= SAMPLE_WIDTH else first[:SAMPLE_WIDTH - 3] + "..."
            more = f" (and {len(samples) - 1} more)" if len(samples) > 1 else ""
            self.write(f"sample @ step {step}{more}: {first}")

    @hookimpl
    def preftune_checkpoint(self, step: int, path: str) -> None:
        self.write(f"saved {path} (step {step})")

    @hookimpl
    def preftune_run_end(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if summary.get("status") != "completed":  # the error itself reaches the caller: said once
            self.write(f"run {summary.get('status', 'failed')}")
            return
        self.write(f"done: {fmt(summary, ('steps', 'tokens', 'train_s', 'tokens_per_s'))}")
        for key in ("initial_eval", "final_eval"):
            if summary.get(key):
                self.write(f"{key}: {fmt(summary[key])}")


def _console(config: Config, options: ConsoleOptions) -> ConsoleSink:
    return ConsoleSink(options)


@hookimpl
def register_sinks(register: Any) -> None:
    register("console", _console, ConsoleOptions)
