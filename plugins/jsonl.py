"""The ``jsonl`` sink: ``metrics.jsonl`` (one object per optimizer step), ``eval.jsonl`` (one
object per evaluation) and, with ``eval_samples``, ``samples.jsonl`` (one object per generated
sample) in the run's ``log_path``. Each line is flushed when written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from preftune import Config, DiskError, hookimpl


class JsonlSink:
    def __init__(self, log_path: str):
        self.dir = Path(log_path)
        self.files: dict[str, TextIO] = {}
        self.resume_step = 0

    def _write(self, name: str, row: dict[str, Any]) -> None:
        try:
            if name not in self.files:
                self.files[name] = self._open(self.dir / name)
            handle = self.files[name]
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        except OSError as exc:  # a full disk, say: name the file (a resume drops a cut-off line)
            raise DiskError(self.dir / name, exc.strerror or str(exc)) from exc

    def _open(self, path: Path) -> TextIO:
        """A fresh file, or on resume the rows up to the checkpoint's step (a run killed after
        it wrote later rows, or mid-line, redoes those steps)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.resume_step and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= self.resume_step:
                    kept.append(line + "\n")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a kill now loses no row
        return open(path, "a", encoding="utf-8")

    @hookimpl
    def preftune_run_start(self, config: Config, info: dict[str, Any], backend: Any) -> None:
        self.resume_step = info.get("resume_step", 0)

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._write("metrics.jsonl", {"step": step, **metrics})

    @hookimpl
    def preftune_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._write("eval.jsonl", {"step": step, **metrics})

    @hookimpl
    def preftune_log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for row in samples:
            self._write("samples.jsonl", row)

    @hookimpl
    def preftune_run_end(self, summary: dict[str, Any]) -> None:
        for handle in self.files.values():
            try:
                handle.close()
            except OSError:
                pass  # a line the disk refused was reported when it was written
        self.files.clear()


def _jsonl(config: Config, options: Any) -> JsonlSink:
    return JsonlSink(config.log_path)


@hookimpl
def register_sinks(register: Any) -> None:
    register("jsonl", _jsonl)
