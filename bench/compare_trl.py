"""Side by side: TRL's DPOTrainer, preftune and a plain PyTorch DPO loop (issue 13, section 3).

    python bench/compare_trl.py --fixture all --rounds 5 --out bench/results.json
    python bench/compare_trl.py --scaling --rounds 3 --out bench/scaling.json

All three train the same model directory on the same pairs with the same batch size, learning
rate, beta, number of optimizer steps (one epoch over steps x batch pairs), float32 on the CPU,
the same torch thread count, no gradient clipping, weight decay 0, a constant LR, no warmup, no
eval, no checkpoints and no W&B; each saves its final weights. Each run is its own process in a
fresh directory (so preftune's reference cache and TRL's datasets cache start empty), and round r
runs the contenders in an order rotated by r. See contenders.py for how each number is measured.

A run measured while the machine is busy is invalid. Before each run the script waits (``--settle``)
for the 1-minute load average to fall to 0.5 (right after a contender it still counts that
contender's threads); it records the load average at the start and end of each run and the cores
that were busy in the second before it, and warns when a run starts above 0.5.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import contenders
import fixtures
from contenders import Job
from fixtures import Fixture
from summary import BUSY_LOAD, describe, run_lines, scaling_table, summarize, table

# ---- the machine ----


def cpu_busy_cores(window_s: float = 1.0) -> float:
    """Cores' worth of CPU time all processes used over the next ``window_s`` seconds."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    (total0, idle0), _, (total1, idle1) = sample(), time.sleep(window_s), sample()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """What ran the benchmark: cores, CPU model, memory, versions, date."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0") if Path("/proc/meminfo").exists() else "0"
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu": model,
            "mem_gib": round(int(mem) / 2**20, 1), "python": platform.python_version(),
            "torch_threads": threads, "load_average": os.getloadavg(),
            "versions": {n: version(n) for n in ("torch", "transformers", "trl", "datasets", "preftune")}}


# ---- one child process ----


def read_stream(stream: Any, events: list[tuple[float, str]]) -> None:
    """Collect a child's output as (arrival time, line) pairs; ``\\r`` ends a line too (tqdm)."""
    pending = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        now = time.perf_counter()
        parts = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
        pending = parts.pop()
        events.extend((now, p.decode(errors="replace")) for p in parts if p.strip())
    if pending.strip():
        events.append((time.perf_counter(), pending.decode(errors="replace")))


def child_env(job: Job) -> dict[str, str]:
    """The same environment for every contender: threads (none set with ``--threads 0``: each
    contender's own default), offline, no telemetry, fresh caches."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    count = str(job.threads)
    threads = {"OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count} if job.threads else {}
    return {**env, **threads,
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TINKER_TELEMETRY": "0", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(job.dir / "hf_datasets"), "BENCH_REPORT": str(job.dir / "report.json")}


def run_child(job: Job) -> dict[str, Any]:
    """Run one contender; its wall time, load before/after, and the numbers it reports."""
    job.dir.mkdir(parents=True)
    cmd = contenders.command(job)
    busy, load_start = cpu_busy_cores(), os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(job), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[tuple[float, str]] = []
    err: list[tuple[float, str]] = []
    readers = [threading.Thread(target=read_stream, args=(s, e)) for s, e in ((proc.stdout, out),
                                                                              (proc.stderr, err))]
    for reader in readers:
        reader.start()
    rc = proc.wait()
    wall = time.perf_counter() - start
    for reader in readers:
        reader.join()
    (job.dir / "stderr.log").write_text("".join(f"{t - start:9.3f}  {line}\n" for t, line in err))
    report_file = job.dir / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    stdout = "\n".join(line for _, line in out)
    result = {"contender": job.contender, "rc": rc, "wall_s": wall, "load_start": load_start,
              "load_end": os.getloadavg()[0], "busy_cores_before": busy,
              **contenders.collect(job, report, stdout, err)}
    if rc != 0:
        result["stderr_tail"] = [line for _, line in err[-25:]]
    return result


# ---- rounds ----


def run_subset(fixture: Fixture, pairs: int, directory: Path) -> Path:
    """The first ``pairs`` pairs of the fixture: what every contender trains on, one epoch."""
    lines = fixture.pairs_file.read_text(encoding="utf-8").splitlines(keepends=True)
    if pairs > len(lines):
        raise SystemExit(f"{fixture.spec.name}: {pairs} pairs asked for, the fixture has {len(lines)}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pairs.jsonl"
    path.write_text("".join(lines[:pairs]), encoding="utf-8")
    return path


def rotated(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def settle(max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) for the 1-minute load average to fall to :data:`BUSY_LOAD`:
    right after a contender it still counts that contender's own threads."""
    start = time.perf_counter()
    while os.getloadavg()[0] > BUSY_LOAD and time.perf_counter() - start < max_wait_s:
        time.sleep(2.0)
    return time.perf_counter() - start


def warn_if_busy(result: dict[str, Any], label: str) -> None:
    if result["load_start"] > BUSY_LOAD:
        print(f"[bench]   WARNING {label}: load average {result['load_start']:.2f} > {BUSY_LOAD} at the "
              f"start ({result['busy_cores_before']:.2f} cores busy in the second before it): a "
              "measurement on a busy machine is invalid", file=sys.stderr)


def measure(fixture: Fixture, names: list[str], args: argparse.Namespace, root: Path) -> list[dict]:
    """``args.rounds`` rounds of every contender on ``fixture``, in rotated order."""
    batch = fixture.spec.batch
    steps = args.steps or fixture.spec.pairs // batch
    data = run_subset(fixture, steps * batch, root)
    max_seq_len = fixture.spec.max_seq_len or fixture.stats["sequence_tokens_max"] + 64  # no truncation
    runs = []
    for r in range(args.rounds):
        for name in rotated(names, r):
            job = Job(name, fixture, data, steps, batch, args.lr, args.beta, args.threads, args.seed,
                      max_seq_len, root / f"round{r}-{name}", args.checkpointing)
            label = f"{fixture.spec.name} round {r + 1}/{args.rounds} {name}"
            waited = settle(args.settle)
            print(f"[bench] {label} ...", file=sys.stderr, flush=True)
            result = {"round": r, "settle_s": waited, **run_child(job)}
            warn_if_busy(result, label)
            print(f"[bench]   {brief(result)}", file=sys.stderr, flush=True)
            runs.append(result)
            if not args.keep_runs:
                shutil.rmtree(job.dir, ignore_errors=True)
            os.sync()  # flush the saved weights now, not during the next contender's run
    return runs


def brief(result: dict[str, Any]) -> str:
    if result["rc"] != 0:
        return f"FAILED rc={result['rc']}: " + " | ".join(result.get("stderr_tail", [])[-3:])
    losses = result.get("losses") or [math.nan]
    problems = f"  PROBLEMS {result['problems']}" if result.get("problems") else ""
    return (f"wall {result['wall_s']:.1f}s  loss0 {losses[0]:.4f}  final {losses[-1]:.4f}  "
            f"peak {result.get('peak_rss_bytes', 0) / 2**20:.0f} MiB  threads {result.get('torch_threads')}  "
            f"load {result['load_start']:.2f} -> {result['load_end']:.2f}{problems}")


# ---- main ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="all", choices=[*fixtures.FIXTURES, "all"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (default: one pass over "
                        "the fixture's pairs); the first steps x batch pairs are used")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of every contender (default: nproc; 0: each one's own "
                        "default, preftune's [local] threads = 0 included)")
    parser.add_argument("--contenders", default=None, help="comma-separated subset of trl,preftune,plain "
                        "(default: all three; with --scaling: preftune,trl)")
    parser.add_argument("--scaling", action="store_true", help="tokens/s and peak RSS at max_seq_len "
                        f"{', '.join(map(str, fixtures.SCALING_LENGTHS))} (default contenders: preftune,trl)")
    parser.add_argument("--lengths", default=",".join(map(str, fixtures.SCALING_LENGTHS)),
                        help="with --scaling: the max_seq_len values")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing for trl "
                        "(its default) and preftune ([local] activation_checkpointing); plain has none")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle", type=float, default=90.0, help="before each run, wait up to this many "
                        f"seconds for the 1-minute load average to fall to {BUSY_LOAD}; 0 = do not wait")
    parser.add_argument("--out", type=Path, default=None, help="write raw results as JSON here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where run directories go (default: a temp dir)")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's directory")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # 2-layer models: dev only
    args = parser.parse_args(argv)
    if args.contenders is None:
        args.contenders = "preftune,trl" if args.scaling else ",".join(contenders.NAMES)
    return args


def fixture_specs(args: argparse.Namespace) -> list[fixtures.FixtureSpec]:
    if args.scaling:
        specs = [fixtures.scaling_spec(int(n)) for n in args.lengths.split(",")]
    else:
        chosen = list(fixtures.FIXTURES) if args.fixture == "all" else [args.fixture]
        specs = [fixtures.FIXTURES[name] for name in chosen]
    return [fixtures.smoke_spec(s) for s in specs] if args.smoke else specs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = set(names) - set(contenders.NAMES)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {', '.join(contenders.NAMES)}")
    machine = machine_info(args.threads)
    print(f"[bench] {machine['nproc']} cores ({machine['cpu']}), torch threads {args.threads}, load average "
          f"{' '.join(f'{x:.2f}' for x in machine['load_average'])}; preftune [local] threads option: "
          f"{'yes' if contenders.preftune_has_threads_option() else 'no (OMP_NUM_THREADS only)'}",
          file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="preftune-bench-", dir=args.workdir))
    results: dict[str, Any] = {}
    for spec in fixture_specs(args):
        fixture = fixtures.ensure(spec)
        runs = measure(fixture, names, args, root / spec.name)
        results[spec.name] = {"spec": asdict(fixture.spec),
                              "stats": {k: v for k, v in fixture.stats.items() if k != "pair_tokens"},
                              "runs": runs, "summary": summarize(runs, names)}
        print(f"\n{describe(fixture, runs)}\n{table(results[spec.name]['summary'])}\n\n{run_lines(runs)}\n",
              flush=True)
    if args.scaling:
        print(scaling_table(results, names), flush=True)
    machine["load_average_end"] = os.getloadavg()
    print(f"machine: {machine['nproc']} cores, {machine['cpu']}, torch threads {args.threads}; "
          f"load average start {machine['load_average'][0]:.2f}, end {machine['load_average_end'][0]:.2f}; "
          f"{machine['date']}")
    if args.out:
        payload = {"machine": machine, "settings": {k: str(v) if isinstance(v, Path) else v
                                                    for k, v in vars(args).items()}, "results": results}
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"raw results: {args.out}")
    if not args.keep_runs:
        shutil.rmtree(root, ignore_errors=True)
    failed = any(r["rc"] != 0 for entry in results.values() for r in entry["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
