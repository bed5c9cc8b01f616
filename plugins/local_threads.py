"""How many CPU threads the ``local`` backend gives torch when ``[local] threads = 0``.

The cores that are idle when the run starts: a thread that has to wait for a core other work
keeps busy stalls every step (each op waits for its slowest thread), while on a quiet machine
every idle core speeds a step up. The rule (:func:`pick_threads`) is pure; the readers around it
measure this machine: the CPUs this process may run on (its affinity), a cgroup CPU quota
(``/sys/fs/cgroup/cpu.max``), and how busy those CPUs are (``/proc/stat`` sampled over 0.2 s,
else the 1-minute load average).
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

SAMPLE_S = 0.2  # how long /proc/stat is sampled
REUSE_S = 30.0  # a process that starts several runs (tests, a notebook) samples at most this often
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PROC_STAT = Path("/proc/stat")


def pick_threads(cores: int, busy: float | None, quota: float | None) -> int:
    """Threads for ``cores`` usable CPUs of which ``busy`` are kept busy by other work (None:
    unknown), under a cgroup ``quota`` in CPUs (None: no quota): the idle cores, rounded to the
    nearest whole core, no more than the quota allows, at least 1."""
    usable = cores if quota is None else min(cores, math.floor(quota))
    idle = usable if busy is None else math.floor(cores - busy + 0.5)
    return max(1, min(usable, idle))


def cpu_quota(path: Path = CPU_MAX) -> float | None:
    """The cgroup v2 CPU quota in CPUs (``"200000 100000"`` is 2.0), or None without one."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_times(path: Path = PROC_STAT) -> dict[int, tuple[int, int]]:
    """``cpu -> (idle, total)`` jiffies since boot from ``/proc/stat`` (idle counts iowait)."""
    times = {}
    for line in path.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return times


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                 cpus: list[int]) -> float:
    """How many of ``cpus`` were busy between two :func:`cpu_times` samples (0 to len(cpus))."""
    busy = 0.0
    for cpu in cpus:
        idle = after[cpu][0] - before[cpu][0]
        total = after[cpu][1] - before[cpu][1]
        busy += 1 - idle / total if total > 0 else 0.0
    return busy


def busy_cores(cpus: list[int]) -> float | None:
    """How many of ``cpus`` other work keeps busy now (this process sleeps while it looks), or
    None where it cannot be read."""
    try:
        before = cpu_times()
        time.sleep(SAMPLE_S)
        return busy_between(before, cpu_times(), cpus)
    except (OSError, ValueError, KeyError, IndexError):
        pass
    try:
        return min(float(len(cpus)), os.getloadavg()[0])
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def _busy_cores_once(period: int, cpus: tuple[int, ...]) -> float | None:
    return busy_cores(list(cpus))


def machine_threads() -> tuple[int, str]:
    """Threads for ``threads = 0`` on this machine now, and why (for the run's log)."""
    cpus = allowed_cpus()
    quota = cpu_quota()
    busy = _busy_cores_once(int(time.monotonic() // REUSE_S), tuple(cpus))
    threads = pick_threads(len(cpus), busy, quota)
    seen = "load unknown" if busy is None else f"{len(cpus) - busy:.1f} of {len(cpus)} cores idle"
    return threads, seen + (f", CPU quota {quota:g}" if quota is not None else "")


def cpu_threads(count: int) -> str:
    """``1 CPU thread``, ``2 CPU threads``."""
    return f"{count} CPU thread" + ("s" if count > 1 else "")
