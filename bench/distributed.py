"""Throughput of one process against two (torchrun, DDP and FSDP2) on the same run.

Each contender trains the ``balanced`` fixture (or ``--fixture``) with the same config: one
process with one thread, ``torchrun --nproc_per_node 2`` with one thread per process (gloo on a
CPU, NCCL where each process has a GPU) as ``ddp`` and as ``fsdp``, and one process with
preftune's default thread count (the idle cores: what a user who does not use torchrun gets).
Contenders alternate, ``--rounds`` times, each in its
own log and cache directories (the reference pass is computed every time). Reported: min and
median of the training tokens/s (``summary.json``: tokens / train_s), of the whole command's wall
time, and the 1-minute load average at the start of each run.

    python bench/distributed.py --rounds 3 [--fixture balanced] [--epochs 2] [--device cpu] [--settle 45]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures import FIXTURES, ensure  # noqa: E402

CONFIG = """
base_model = "{model}"
dataset = "{pairs}"
log_path = "{log}"
cache_dir = "{cache}"
batch_size = {batch}
grad_accum = 1
epochs = {epochs}
max_seq_len = {max_seq_len}
eval_fraction = 0.0
learning_rate = 1e-5
device = "{device}"
sinks = ["jsonl"]

[local]
threads = {threads}
parallel = "{parallel}"
"""

# name: (processes, parallel, threads per process; 0 = preftune's default, the idle cores)
CONTENDERS = {"1 process": (1, "ddp", 1), "2 processes, ddp": (2, "ddp", 1),
              "2 processes, fsdp": (2, "fsdp", 1), "1 process, default threads": (1, "ddp", 0)}


def run_one(name: str, work: Path, fixture: object, args: argparse.Namespace, n: int) -> dict[str, float]:
    processes, parallel, threads = CONTENDERS[name]
    tag = f"{name.replace(' ', '').replace(',', '-')}-{n}"
    config = work / f"{tag}.toml"
    config.write_text(CONFIG.format(model=fixture.model_dir, pairs=fixture.pairs_file,
                                    log=work / tag, cache=work / f"cache-{tag}", batch=fixture.spec.batch,
                                    epochs=args.epochs, max_seq_len=fixture.stats["max_seq_len"],
                                    device=args.device, parallel=parallel, threads=threads))
    launch = ([sys.executable, "-m", "preftune"] if processes == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), "-m", "preftune"])
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun sets 1
    env["PREFTUNE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    deadline = time.monotonic() + args.settle  # let the last run's load fade
    while os.getloadavg()[0] > 0.5 and time.monotonic() < deadline:
        time.sleep(2)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([*launch, "run", str(config)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((work / tag / "summary.json").read_text())
    return {"tokens_per_s": summary["tokens_per_s"], "train_s": summary["train_s"], "wall_s": wall,
            "load": load, "steps": summary["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", default="balanced", choices=sorted(FIXTURES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settle", type=float, default=45,
                        help="seconds to wait at most for the 1-minute load to drop to 0.5 before a run")
    parser.add_argument("--contenders", nargs="*", choices=sorted(CONTENDERS), help="default: all")
    parser.add_argument("--out", help="write every run as JSON here")
    args = parser.parse_args()
    fixture = ensure(FIXTURES[args.fixture])
    longest = fixture.spec.max_seq_len or fixture.stats["sequence_tokens_max"] + 64
    fixture.stats.setdefault("max_seq_len", longest)
    chosen = args.contenders or list(CONTENDERS)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            for name in chosen:  # alternate: a slow minute hits every contender alike
                results[name].append(run_one(name, Path(tmp), fixture, args, n))
                print(f"round {n + 1} {name}: {results[name][-1]}", file=sys.stderr)
    print(f"fixture {args.fixture}, {args.rounds} rounds, {args.epochs} epochs, device {args.device}")
    for name, runs in results.items():
        tps = [r["tokens_per_s"] for r in runs]
        wall = [r["wall_s"] for r in runs]
        print(f"{name:>18}: tokens/s min {min(tps):8.0f} median {statistics.median(tps):8.0f} | "
              f"wall s min {min(wall):6.1f} median {statistics.median(wall):6.1f} | "
              f"load at start {max(r['load'] for r in runs):.2f} max")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
