"""How fast a dataset is tokenized, cold (rendered with the chat template) and warm (cache hit).

    python bench/tokenize_speed.py                  # 20,000 pairs: cold and warm pairs/s
    python bench/tokenize_speed.py --compare 5000   # also: per pair vs batched vs a process pool

It makes its own data offline (Format 1 JSONL: system prompts, multi-turn prompts, unicode, some
long completions) and tokenizes with the builtin tiny tokenizer, through the same function
``prepare_data`` calls (``preftune.data.pipeline.prepare``). Runs alternate and repeat, and the
best of each is reported (the machine may be shared), with the load average at the time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

WORDS = ("the a of to and in is it you that was for on are with as his they be at one have this "
         "from or had by word but what some we can out other were all there when up use your how "
         "said an each she which do their time if will way about many then them write would like "
         "so these her long make thing see him two has look more day could go come did number "
         "sound no most people my over know water than call first who may down side been now find "
         "héllo wörld naïve café 日本語 données ñandú Straße").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def record(rng: random.Random) -> dict[str, Any]:
    """One Format 1 record: a prompt of 1-3 user turns (some with a system prompt), two answers."""
    prompt = [{"role": "system", "content": text(rng, rng.randint(5, 30))}] if rng.random() < 0.3 else []
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        prompt += [{"role": "user", "content": text(rng, rng.randint(5, 60))},
                   {"role": "assistant", "content": text(rng, rng.randint(5, 60))}]
    long_prompt = rng.random() < 0.01  # dropped at max_seq_len 1024
    prompt.append({"role": "user", "content": text(rng, 1500 if long_prompt else rng.randint(5, 120))})
    chosen, rejected = (text(rng, 600 if rng.random() < 0.05 else rng.randint(10, 150)) for _ in range(2))
    return {side: {"messages": prompt + [{"role": "assistant", "content": answer}]}
            for side, answer in (("chosen", chosen), ("rejected", rejected))}


def write_dataset(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            handle.write(json.dumps(record(rng), ensure_ascii=False) + "\n")
    return path


def best(times: list[float]) -> str:
    return f"min {min(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})"


def cold_and_warm(path: Path, n: int, rounds: int, max_seq_len: int) -> None:
    """Cold (empty cache) and warm (cache hit) runs of the data pipeline, alternating."""
    from preftune import Config, get_plugin_manager, get_registry
    from preftune.data import make_format
    from preftune.data.pipeline import prepare
    from preftune.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    cold, warm = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            config = Config(base_model="builtin:tiny", dataset=str(path), cache_dir=cache,
                            max_seq_len=max_seq_len)
            registry = get_registry(get_plugin_manager(load_entrypoints=False))
            fmt = make_format(registry, config)
            for times in (cold, warm):
                start = time.perf_counter()
                out = prepare(registry, config, fmt, tokenizer, lambda _: None, progress=False)
                times.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in Path(cache).rglob("*.pt"))
    print(f"{n} pairs -> {len(out.pairs)} kept, {len(out.report.truncated)} truncated, "
          f"{len(out.report.dropped)} dropped (max_seq_len {max_seq_len}); cache file {size / 1e6:.1f} MB")
    print(f"cold (parse + render + save): {n / min(cold):8.0f} pairs/s  {best(cold)}")
    print(f"warm (cache hit):             {n / min(warm):8.0f} pairs/s  {best(warm)}")


_TOKENIZER: Any = None


def _init_worker() -> None:
    global _TOKENIZER
    from preftune.tiny import tiny_tokenizer

    _TOKENIZER = tiny_tokenizer()


def _shard(args: tuple[list[Any], int]) -> list[Any]:
    from preftune.data import tokenize_pairs

    return tokenize_pairs(_TOKENIZER, args[0], args[1])[0]


def compare(path: Path, n: int, rounds: int, max_seq_len: int) -> None:
    """Per-pair rendering vs batched vs a 2-process pool on ``n`` pairs: equal output, pairs/s."""
    from preftune import Config, get_plugin_manager, get_registry
    from preftune.data import load_pairs, make_format, tokenize_pair, tokenize_pairs
    from preftune.tiny import tiny_tokenizer

    config = Config(base_model="builtin:tiny", dataset=str(path))
    pairs = load_pairs(path, make_format(get_registry(get_plugin_manager(load_entrypoints=False)), config))
    pairs, tokenizer = pairs[:n], tiny_tokenizer()

    def per_pair() -> list[Any]:
        out = (tokenize_pair(tokenizer, p, max_seq_len) for p in pairs)
        return [t for t in out if t is not None]

    def pool() -> list[Any]:
        shards = [(pairs[i : i + 256], max_seq_len) for i in range(0, len(pairs), 256)]
        with ProcessPoolExecutor(2, mp_context=mp.get_context("fork"), initializer=_init_worker) as ex:
            return [t for shard in ex.map(_shard, shards) for t in shard]

    methods: dict[str, Callable[[], list[Any]]] = {
        "per pair": per_pair, "batched": lambda: tokenize_pairs(tokenizer, pairs, max_seq_len)[0],
        "pool of 2, batched": pool}
    reference = per_pair()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            out = method()
            times[name].append(time.perf_counter() - start)
            assert out == reference, f"{name} differs from per-pair tokenization"
    for name, values in times.items():
        print(f"{name:20s} {n / min(values):8.0f} pairs/s  {best(values)}  (equal to per pair)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--compare", type=int, default=0, metavar="N",
                        help="also compare per-pair, batched and pooled tokenization on N pairs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dataset(Path(tmp) / "train.jsonl", args.pairs)
        if args.compare:
            compare(path, min(args.compare, args.pairs), args.rounds, args.max_seq_len)
        cold_and_warm(path, args.pairs, args.rounds, args.max_seq_len)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
