"""Records to token files a chunk at a time, on worker processes: the same result as one process."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from preftune import Config
from preftune.data import make_format
from preftune.data.pipeline import prepare
from preftune.tiny import tiny_tokenizer


def mixed(tmp_path: Path, pair_record: Any, n: int = 90) -> Path:
    """Good pairs, bad lines (broken JSON, a control token) and pairs dropped at max_seq_len."""
    lines = []
    for i in range(n):
        record = pair_record(f"Question {i}: " + ("long " * 40 if i % 17 == 3 else "short?"),
                             f"Answer {i} yes.", f"Answer {i} no.")
        if i % 13 == 5:
            record["chosen"]["messages"][-1]["content"] += "<|im_start|>"
        lines.append("{oops" if i % 11 == 7 else json.dumps(record))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(tmp_path: Path, registry: Any, data: Path, workers: int, **settings: Any) -> Any:
    config = Config(base_model="builtin:tiny", dataset=str(data), max_seq_len=48, on_bad_record="skip",
                    max_bad_fraction=1.0, data_workers=workers,
                    cache_dir=str(tmp_path / f"cache-{workers}-{len(settings)}"), **settings)
    return prepare(registry, config, make_format(registry, config), tiny_tokenizer(), lambda _: None,
                   progress=False)


@pytest.mark.parametrize("settings", [{}, {"max_pairs": 37}])
def test_workers_and_chunks_give_what_one_process_gives(
    tmp_path: Path, registry: Any, pair_record: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    import preftune.data.build as build_module

    data = mixed(tmp_path, pair_record)
    whole = build(tmp_path, registry, data, 1, **settings)  # one chunk: everything at once
    monkeypatch.setattr(build_module, "CHUNK_RECORDS", 8)  # 12 chunks, on forked workers:
    monkeypatch.setattr(build_module, "default_workers", lambda: 2)  # data_workers = 0, the default
    pools: list[Any] = []
    real_pool = build_module.worker_pool

    @contextmanager
    def watched(*args: Any) -> Any:
        with real_pool(*args) as pool:
            pools.append(pool)
            yield pool

    monkeypatch.setattr(build_module, "worker_pool", watched)
    parallel = build(tmp_path, registry, data, 0, **settings)
    assert pools and all(pool is not None for pool in pools)  # the chunks ran on worker processes
    assert len(whole.pairs) > 20 and whole.problems and whole.report.dropped
    assert parallel.pairs == whole.pairs and parallel.sha256 == whole.sha256
    assert [p.as_tuple() for p in parallel.problems] == [p.as_tuple() for p in whole.problems]
    assert parallel.report == whole.report and parallel.records == whole.records
    if settings:  # reading stops at the record of the 37th pair that parses, in every mode
        parsing = [i for i in range(90) if i % 11 != 7]
        assert whole.records == parsing[36] + 1


def test_the_garbage_collector_is_paused_for_a_chunk_and_the_heap_frozen_for_a_build(
        tmp_path: Path, registry: Any, pair_record: Any) -> None:
    """During a chunk the collector is off, during a build the objects that were there before are
    frozen; afterwards both are as they were, a caller's own freeze and pause included."""
    import gc

    from preftune.data import build as building

    seen = []
    work = building._work_chunk

    def spy(reads: Any) -> Any:
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        return work(reads)

    building._work_chunk, was = spy, gc.isenabled()
    try:
        gc.enable()
        build(tmp_path, registry, mixed(tmp_path, pair_record), 1)
        assert seen == [(False, True)] and gc.isenabled() and gc.get_freeze_count() == 0
        gc.disable()
        gc.freeze()
        build(tmp_path, registry, mixed(tmp_path, pair_record, 91), 1)
        assert seen[1] == (False, True) and not gc.isenabled()
        assert gc.get_freeze_count() > 0  # the caller's freeze is theirs to undo
    finally:
        building._work_chunk = work
        gc.unfreeze()
        if was:
            gc.enable()


def test_a_chunk_s_pair_digests_are_each_pair_s_digest() -> None:
    """A pair's digest is blake2b (16 bytes) of each part's length and int32 tokens, little-endian:
    the digests a cache already holds stay valid."""
    import hashlib
    import random
    import struct

    from preftune.data.table import Packed
    from preftune.types import TokenizedPair

    rng = random.Random(0)

    def ids() -> tuple[int, ...]:
        return tuple(rng.randrange(200_000) for _ in range(rng.randint(1, 40)))

    pairs = [TokenizedPair(ids(), ids(), ids(), (), ()) for _ in range(50)]
    packed = Packed.of(pairs)
    for i, pair in enumerate(pairs):
        digest = hashlib.blake2b(digest_size=16)
        for part in (pair.prompt, pair.chosen, pair.rejected):
            digest.update(struct.pack(f"<I{len(part)}i", len(part), *part))
        assert digest.digest() == packed.digests[16 * i : 16 * (i + 1)]
