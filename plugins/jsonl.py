"""The ``jsonl`` sink: ``metrics.jsonl`` (one object per optimizer step) and ``eval.jsonl``
(one object per evaluation) in the run's ``log_path``. Each line is flushed when written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from preftune import Config, hookimpl


class JsonlSink:
    def __init__(self, log_path: str):
        self.dir = Path(log_path)
        self.files: dict[str, TextIO] = {}

    def _write(self, name: str, row: dict[str, Any]) -> None:
        if name not in self.files:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.files[name] = open(self.dir / name, "w", encoding="utf-8")
        handle = self.files[name]
        handle.write(json.dumps(row) + "\n")
        handle.flush()

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._write("metrics.jsonl", {"step": step, **metrics})

    @hookimpl
    def preftune_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._write("eval.jsonl", {"step": step, **metrics})

    @hookimpl
    def preftune_run_end(self, summary: dict[str, Any]) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()


def _jsonl(config: Config, options: Any) -> JsonlSink:
    return JsonlSink(config.log_path)


@hookimpl
def register_sinks(register: Any) -> None:
    register("jsonl", _jsonl)
