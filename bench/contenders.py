"""The three contenders: how each is launched, and how its numbers are read back.

Every contender is its own process, started by :func:`compare_trl.run_child`, and writes its peak
RSS and torch thread count to ``$BENCH_REPORT`` at exit (see :mod:`benchutil`). How the other
numbers are measured:

========== ======================================= ============================================
contender  training time, tokens, losses            reference-pass time
========== ======================================= ============================================
preftune   metrics.jsonl: last row's ``elapsed_s``  the summary's ``reference_s``: from building the
           (loop start to the last optimizer step),  reference provider to closing it. That span
           summary ``tokens``, each row's ``loss``   holds the reference model's load (the
                                                     ``separate`` provider loads a second copy on its
                                                     first forward), the forwards and the cache write.
                                                     (Before the progress bar stopped drawing into
                                                     pipes it was read from the bar's timestamps.)
trl        ``on_train_begin`` to the last            ``DPOTrainer._precompute_ref_logps`` timed in
           ``on_step_end``; tokens counted by the    the process (forwards with the policy itself,
           collator; losses from ``on_log``          plus writing its Arrow cache).
plain      its loop, timed in the process            its ``no_grad`` loop, timed in the process.
========== ======================================= ============================================

Tokens are the non-padding tokens of the trained sequences: 2 x prompt + chosen + rejected per pair.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixtures import Fixture

BENCH = Path(__file__).resolve().parent
DOCS_CONFIG = BENCH.parent / "docs" / "config.md"
NAMES = ("trl", "preftune", "plain")


@dataclass
class Job:
    """One contender on one fixture, in its own fresh directory."""

    contender: str
    fixture: Fixture
    data: Path  # the pairs all contenders train on (steps x batch of them)
    steps: int
    batch: int
    lr: float
    beta: float
    threads: int
    seed: int
    max_seq_len: int
    dir: Path
    checkpointing: bool = False  # activation checkpointing (TRL's default) for trl and preftune
    precision: str = "fp32"  # preftune's [local] precision (the others train in float32)

    @property
    def ref_batch(self) -> int:
        """Forward-only batch size, preftune's rule (``max(2 * batch_size, 8)``), for everyone."""
        return max(2 * self.batch, 8)


def preftune_has_local_option(name: str) -> bool:
    """True when docs/config.md lists ``name`` in the ``[local]`` table (the checkout under test
    may be an older commit)."""
    if not DOCS_CONFIG.exists():
        return False
    text = DOCS_CONFIG.read_text(encoding="utf-8")
    local = text.split("### `[local]`", 1)[-1].split("\n### ", 1)[0] if "### `[local]`" in text else ""
    return f"| `{name}` |" in local


def preftune_has_threads_option() -> bool:
    return preftune_has_local_option("threads")


def preftune_config(job: Job) -> str:
    """The TOML config of a preftune run: same data, batch, LR, beta and steps as the others."""
    local = {"precision": job.precision} if preftune_has_local_option("precision") else {"dtype": "float32"}
    if preftune_has_threads_option():
        local["threads"] = job.threads
    if job.checkpointing:
        local["activation_checkpointing"] = True
    top = {"base_model": str(job.fixture.model_dir), "dataset": str(job.data),
           "log_path": str(job.dir / "run"), "cache_dir": str(job.dir / "cache"),
           "eval_fraction": 0, "beta": job.beta, "epochs": 1, "batch_size": job.batch,
           "grad_accum": 1, "learning_rate": job.lr, "lr_schedule": "constant", "warmup_steps": 0,
           "weight_decay": 0.0, "max_grad_norm": 0.0, "max_seq_len": job.max_seq_len, "seed": job.seed,
           "lora_rank": 0, "checkpoint_interval": 0, "sinks": ["jsonl"], "device": "cpu"}
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    lines += ["", "[local]"] + [f"{k} = {json.dumps(v)}" for k, v in local.items()]
    return "\n".join(lines) + "\n"


def command(job: Job) -> list[str]:
    """The child's command line (``$BENCH_REPORT`` is set by the caller)."""
    if job.contender == "preftune":
        config = job.dir / "config.toml"
        config.write_text(preftune_config(job))
        return [sys.executable, str(BENCH / "run_cli.py"), "preftune", "run", str(config)]
    script = {"trl": "trl_dpo.py", "plain": "plain_dpo.py"}[job.contender]
    return [sys.executable, str(BENCH / script), "--model", str(job.fixture.model_dir),
            "--data", str(job.data), "--out", str(job.dir / "out"), "--steps", str(job.steps),
            "--batch", str(job.batch), "--ref-batch", str(job.ref_batch), "--lr", str(job.lr),
            "--beta", str(job.beta), "--threads", str(job.threads), "--seed", str(job.seed)] + (
                ["--checkpointing"] if job.checkpointing and job.contender == "trl" else [])


def last_json_object(text: str) -> dict[str, Any] | None:
    """The last JSON object in ``text`` that starts at the beginning of a line."""
    decoder, found = json.JSONDecoder(), None
    for match in re.finditer(r"^\{", text, flags=re.M):
        try:
            value, _ = decoder.raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found = value
    return found


def preftune_ref_seconds(events: list[tuple[float, str]]) -> float | None:
    """From the first render of the reference progress bar to the "cached N pairs" log line."""
    start = next((t for t, line in events if line.lstrip().startswith("reference log-probs")), None)
    end = next((t for t, line in events if "reference log-probs: cached" in line), None)
    return end - start if start is not None and end is not None else None


def collect_preftune(job: Job, stdout: str, events: list[tuple[float, str]]) -> dict[str, Any]:
    """Losses and timing from metrics.jsonl, tokens from the JSON summary, ref time from stderr."""
    metrics_file = job.dir / "run" / "metrics.jsonl"
    text = metrics_file.read_text() if metrics_file.exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    summary = last_json_object(stdout) or {}
    problems = [f"{k}={summary[k]}" for k in ("dropped_pairs", "truncated_pairs") if summary.get(k)]
    return {"losses": [r["loss"] for r in rows], "train_s": rows[-1]["elapsed_s"] if rows else None,
            "tokens": summary.get("tokens"), "steps": summary.get("steps"),
            "ref_s": summary.get("reference_s", preftune_ref_seconds(events)), "problems": problems}


def collect(job: Job, report: dict[str, Any], stdout: str,
            events: list[tuple[float, str]]) -> dict[str, Any]:
    """The contender's numbers; ``report`` is what it wrote to ``$BENCH_REPORT``."""
    out = dict(report)
    if job.contender == "preftune":
        out.update(collect_preftune(job, stdout, events))
    else:
        out["steps"] = len(out.get("losses", []))
    tokens, train_s = out.get("tokens"), out.get("train_s")
    out["tokens_per_s"] = tokens / train_s if tokens and train_s else None
    return out
