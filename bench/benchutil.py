"""What the benchmark's child processes share: their report file, peak RSS, threads, the data.

Each child fills :data:`REPORT` and, at exit, writes it to ``$BENCH_REPORT`` as JSON together with
its own peak resident set size (``VmHWM`` of ``/proc/self/status``: the high-water mark of this
process's memory since its ``exec``) and torch's intra-op thread count. The parent reads that file,
so every contender's peak is measured the same way, inside the contender's own process.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from typing import Any

REPORT: dict[str, Any] = {}


def peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` where /proc has it, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write_report(path: str) -> None:
    torch = sys.modules.get("torch")
    extra = {"peak_rss_bytes": peak_rss_bytes(),
             "torch_threads": torch.get_num_threads() if torch is not None else None}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({**REPORT, **extra}, handle)


def install_report() -> None:
    """Write :data:`REPORT` (plus peak RSS and threads) to ``$BENCH_REPORT`` when the process exits."""
    path = os.environ.get("BENCH_REPORT")
    if path:
        atexit.register(_write_report, path)


def read_pairs(path: str) -> list[dict[str, list[dict[str, str]]]]:
    """Format 1 records as conversational prompt/chosen/rejected message lists (TRL's layout)."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            chosen, rejected = record["chosen"]["messages"], record["rejected"]["messages"]
            if chosen[:-1] != rejected[:-1]:
                raise ValueError("chosen and rejected must share every message but the last")
            out.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
    return out
