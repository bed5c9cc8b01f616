"""Preference data to tokens: preftune's pipeline beside TRL's own preparation of the same pairs.

    python bench/data_speed.py --pairs 20000 --rounds 3      # cold and warm pairs/s, peak RSS
    python bench/data_speed.py --pairs 1000000 --rounds 1 --contenders preftune

The data is written once, offline, as TRL's conversational records (``prompt`` messages, one
assistant message per side) in JSONL: the form both read as they are. Each contender runs in a
fresh process, from the file on disk to token ids, alternating, with the same tokenizer (the
builtin tiny tokenizer's vocabulary, or ``--tokenizer``):

- ``preftune``: ``preftune.data.pipeline.prepare`` with its defaults (``data_workers`` = the cores),
  cold (empty cache: read, parse, check, render, encode, write) and warm (cache hit);
- ``preftune-1``: the same with ``data_workers = 1`` (like for like with TRL's one process);
- ``trl``: ``load_dataset("json")`` then ``DPOTrainer._prepare_dataset`` (TRL 1.16, its defaults:
  ``dataset_num_proc`` None, one process), cold (an empty ``datasets`` cache).

Peak RSS is the contender process's own high-water mark (``ru_maxrss``), and, for preftune's
workers, the largest of them. The load average is printed with each run: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tokenize_speed import text  # noqa: E402  (the same word list as the tokenization benchmark)


def record(rng: random.Random, words: int) -> dict[str, Any]:
    """A TRL conversational record of about ``words`` words: a prompt of 1-3 turns, two answers."""
    prompt = [{"role": "system", "content": text(rng, rng.randint(5, 30))}] if rng.random() < 0.3 else []
    for _ in range(rng.choice([0, 0, 1])):
        prompt += [{"role": "user", "content": text(rng, words // 8)},
                   {"role": "assistant", "content": text(rng, words // 8)}]
    prompt.append({"role": "user", "content": text(rng, rng.randint(words // 6, words // 3))})
    chosen, rejected = (text(rng, rng.randint(words // 6, words // 3)) for _ in range(2))
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def write_data(path: Path, n: int, words: int) -> Path:
    if path.exists():
        return path
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            handle.write(json.dumps(record(rng, words), ensure_ascii=False) + "\n")
    return path


def load_tokenizer(name: str) -> Any:
    from preftune.hub import load_tokenizer as load

    return load(name)


def run_preftune(data: Path, cache: Path, workers: int, tokenizer: str, max_seq_len: int) -> dict[str, Any]:
    from preftune import Config, get_plugin_manager, get_registry
    from preftune.data import make_format
    from preftune.data.pipeline import prepare

    registry = get_registry(get_plugin_manager(load_entrypoints=False))
    config = Config(base_model=tokenizer, dataset=str(data), cache_dir=str(cache), max_seq_len=max_seq_len,
                    data_workers=workers, format="trl_conversational")
    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    out = prepare(registry, config, make_format(registry, config), tok, lambda _: None, progress=False)
    seconds = time.perf_counter() - start
    tokens = int(out.pairs.lengths.sum())
    return {"seconds": seconds, "pairs": len(out.pairs), "tokens": tokens}


def run_trl(data: Path, cache: Path, tokenizer: str, max_seq_len: int) -> dict[str, Any]:
    from types import SimpleNamespace

    import datasets
    from trl.trainer.dpo_trainer import DPOTrainer

    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    trainer = SimpleNamespace(_tokenizer=tok)
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_seq_len, truncation_mode="keep_start")
    prepared = DPOTrainer._prepare_dataset(trainer, dataset, tok, args, "train")
    seconds = time.perf_counter() - start
    tokens = sum(len(p) + len(c) + len(r) for p, c, r in zip(
        prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]))
    return {"seconds": seconds, "pairs": len(prepared), "tokens": tokens}


def child(args: argparse.Namespace) -> None:
    """One contender, in this (fresh) process; prints one JSON line."""
    data, cache = Path(args.data), Path(args.cache)
    if args.child == "trl":
        out = run_trl(data, cache, args.tokenizer, args.max_seq_len)
    else:
        out = run_preftune(data, cache, 1 if args.child == "preftune-1" else 0, args.tokenizer,
                           args.max_seq_len)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(out))


def contender(name: str, data: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-P", __file__, "--child", name, "--data", str(data), "--cache", str(cache),
               "--tokenizer", args.tokenizer, "--max-seq-len", str(args.max_seq_len)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--words", type=int, default=300, help="about this many words a pair")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", default="builtin:tiny")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--contenders", default="preftune,preftune-1,trl")
    parser.add_argument("--data-dir", default=None, help="keep the generated data here (default: a temp dir)")
    parser.add_argument("--child", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="preftune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    data = write_data(root / f"pairs-{args.pairs}-{args.words}.jsonl", args.pairs, args.words)
    print(f"{args.pairs} pairs, {data.stat().st_size / 1e6:.0f} MB of JSONL, tokenizer {args.tokenizer}, "
          f"{os.cpu_count()} cores")
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for name in args.contenders.split(","):
            with tempfile.TemporaryDirectory(dir=root) as cache:
                runs = [contender(name, data, Path(cache), args)]
                if name.startswith("preftune"):
                    runs.append(contender(name, data, Path(cache), args))  # warm: a cache hit
            for label, out in zip(("cold", "warm"), runs):
                out["load"] = os.getloadavg()[0]
                results.setdefault(f"{name} {label}", []).append(out)
                print(f"  {name:11} {label}: {args.pairs / out['seconds']:8.0f} pairs/s  "
                      f"{out['seconds']:7.1f} s  peak RSS {out['peak_rss_mb']:6.0f} MB "
                      f"(workers {out['worker_peak_rss_mb']:.0f} MB)  {out['pairs']} pairs "
                      f"{out['tokens']} tokens  load {out['load']:.2f}", flush=True)
    print("\nbest and median pairs/s, peak RSS of the best:")
    for key, runs in results.items():
        rates = sorted(args.pairs / r["seconds"] for r in runs)
        best = max(runs, key=lambda r: args.pairs / r["seconds"])
        print(f"  {key:16} best {rates[-1]:8.0f}  median {rates[len(rates) // 2]:8.0f}  "
              f"peak RSS {best['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
