"""The tokenized-data cache: rendered once, reused while its key holds, rebuilt (and why) otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from preftune import Config, DataError
from preftune.data import TokenizeReport, load_pairs, make_format, tokenize_pairs
from preftune.data.pipeline import prepare
from preftune.data.table import PairTable
from preftune.data.tokcache import Tokenized, file_sha256, load_or_build
from preftune.tiny import tiny_tokenizer


def records(pair_record: Any, n: int, offset: int = 0) -> list[Any]:
    """Format 1 records with unicode, a system prompt, multi-turn prompts and long answers."""
    out = []
    for i in range(offset, offset + n):
        record = pair_record(f"Question {i}: ¿qué es {'x' * (i % 5)}? 日本",
                             f"Answer {i}." + " ok" * (i % 40), f"Nope {i}, ñ.")
        if i % 3 == 0:
            for side in ("chosen", "rejected"):
                record[side]["messages"][:0] = [{"role": "system", "content": "Be kind."},
                                                {"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]
        out.append(record)
    return out


class Run:
    """Runs the data pipeline as ``prepare_data`` does, keeping the log."""

    def __init__(self, tmp_path: Path, registry: Any, **config: Any):
        self.registry, self.lines = registry, []
        self.config = Config(**{"base_model": "builtin:tiny", "cache_dir": str(tmp_path / "cache"),
                                "max_seq_len": 64, **config})

    def __call__(self, tokenizer: Any = None, **changes: Any) -> Tokenized:
        self.lines.clear()
        for key, value in changes.items():
            setattr(self.config, key, value)
        fmt = make_format(self.registry, self.config)
        return prepare(self.registry, self.config, fmt, tokenizer or tiny_tokenizer(),
                       self.lines.append, progress=False)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def data(tmp_path: Path, pair_record: Any, write_jsonl: Any) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", records(pair_record, 30))
    held = write_jsonl(tmp_path / "held.jsonl", records(pair_record, 6, offset=100))
    return train, held


def cache_files(run: Run) -> list[Path]:
    return sorted(Path(run.config.cache_dir, "tokenized").glob("*.pt"))


def no_rendering(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("rendered on a cache hit")

    monkeypatch.setattr(tokenizer, "apply_chat_template", fail)
    return tokenizer


def test_second_run_reuses_the_cache_without_rendering_and_gets_equal_data(
    tmp_path: Path, registry: Any, data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    train, held = data
    run = Run(tmp_path, registry, dataset=str(train), eval_dataset=str(held), max_pairs=25)
    cold = run()
    assert "cached in" in run.log and len(cache_files(run)) == 1
    assert cache_files(run)[0].parent == tmp_path / "cache" / "tokenized"
    fmt = make_format(registry, run.config)
    raw = load_pairs(train, fmt)[:25] + load_pairs(held, fmt)
    expected, report = tokenize_pairs(tiny_tokenizer(), raw, 64)
    assert cold.pairs == expected and cold.report == report and cold.sha256 == PairTable.of(expected).sha256()
    assert report.truncated and report.dropped and len(expected) + len(report.dropped) == 31

    warm = run(no_rendering(monkeypatch, tiny_tokenizer()))
    assert "reusing cache" in run.log
    assert warm.pairs == cold.pairs and warm.report == cold.report and warm.sha256 == cold.sha256
    assert {p.source.file for p in warm.pairs} == {str(train), str(held)}


def test_dropped_pairs_and_their_sources_survive_the_cache(
    tmp_path: Path, registry: Any, data: tuple[Path, Path]
) -> None:
    run = Run(tmp_path, registry, dataset=str(data[0]), eval_dataset=str(data[1]), max_seq_len=40)
    cold = run()
    warm = run()
    assert cold.report.dropped and warm.report == cold.report and warm.pairs == cold.pairs
    assert {s.file for s in warm.report.dropped} == {str(data[0]), str(data[1])}


@pytest.mark.parametrize("change, value, part", [
    ("max_seq_len", 48, "max_seq_len"),
    ("max_pairs", 10, "max_pairs"),
    ("format", "chosen_rejected", "format"),
])
def test_a_changed_setting_rebuilds_and_names_the_part(
    tmp_path: Path, registry: Any, data: tuple[Path, Path], change: str, value: Any, part: str
) -> None:
    run = Run(tmp_path, registry, dataset=str(data[0]))
    run()
    rebuilt = run(**{change: value})
    assert f"is stale ({part} changed); rebuilding" in run.log
    assert "reusing" in (run(), run.log)[1]
    if change != "format":
        assert rebuilt.pairs != run(**{change: None if change == "max_pairs" else 64}).pairs


def test_changed_file_content_rebuilds_but_a_new_mtime_or_path_spelling_does_not(
    tmp_path: Path, registry: Any, data: tuple[Path, Path], pair_record: Any, write_jsonl: Any,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    train, held = data
    run = Run(tmp_path, registry, dataset=str(train), eval_dataset=str(held))
    first = run()
    os.utime(train, (1, 1))
    assert "reusing" in (run(), run.log)[1]
    monkeypatch.chdir(tmp_path)  # the same files by relative paths: the cache answers with them
    relative = run(dataset="train.jsonl", eval_dataset="held.jsonl")
    assert "reusing" in run.log and relative.pairs[0].source.file == "train.jsonl"
    assert [p.prompt for p in relative.pairs] == [p.prompt for p in first.pairs]
    write_jsonl(held, records(pair_record, 6, offset=200))
    changed = run()
    assert "(eval_dataset changed)" in run.log and changed.sha256 != first.sha256


def test_a_changed_chat_template_or_format_version_rebuilds(
    tmp_path: Path, registry: Any, data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Run(tmp_path, registry, dataset=str(data[0]))
    run()
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace("'\\n'", "'\\n\\n'")
    assert tokenizer.chat_template != tiny_tokenizer().chat_template
    other = run(tokenizer)
    assert "(chat_template_sha256 changed)" in run.log
    assert other.pairs != run().pairs and "(chat_template_sha256 changed)" in run.log
    monkeypatch.setattr("preftune.data.tokcache.FORMAT_VERSION", "0")
    run()
    assert "(format_version changed)" in run.log


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "no parts", "tampered"])
def test_a_damaged_or_foreign_cache_file_is_rebuilt_never_misread(
    tmp_path: Path, registry: Any, data: tuple[Path, Path], damage: str
) -> None:
    run = Run(tmp_path, registry, dataset=str(data[0]))
    good = run()
    [path] = cache_files(run)
    content = torch.load(path, weights_only=True)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "foreign":
        torch.save(torch.zeros(3), path)
    elif damage == "no parts":
        torch.save({"parts": json.dumps([1, 2])}, path)
    else:  # key parts intact, tables inconsistent
        content["lengths"][0, 0] += 1
        torch.save(content, path)
    again = run()
    reason = "damaged" if damage == "tampered" else "unreadable"
    assert f"is {reason}" in run.log and "rebuilding" in run.log and "cached in" in run.log
    assert again.pairs == good.pairs and "reusing" in (run(), run.log)[1]


def test_the_cache_is_flat_tensors_and_an_int32_token_file_that_is_memory_mapped(
    tmp_path: Path, registry: Any, data: tuple[Path, Path]
) -> None:
    run = Run(tmp_path, registry, dataset=str(data[0]))
    out = run()
    [cache_file] = cache_files(run)
    content = torch.load(cache_file, weights_only=True)
    [tokens] = cache_file.parent.glob("*.i32")
    total = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in out.pairs)
    assert tokens.stat().st_size == 4 * total and json.loads(content["meta"])["tokens"] == tokens.name
    warm = run()
    assert isinstance(warm.pairs.tokens, numpy.memmap) and warm.pairs == out.pairs
    assert content["lengths"].shape == (len(out.pairs), 3) and content["data_sha256"] == out.sha256
    assert json.loads(content["parts"])["max_seq_len"] == "64"


def test_bad_data_raises_the_same_error_and_caches_nothing(
    tmp_path: Path, registry: Any, data: tuple[Path, Path], pair_record: Any, write_jsonl: Any
) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", records(pair_record, 3) + ["{not json"])
    run = Run(tmp_path, registry, dataset=str(bad))
    with pytest.raises(DataError) as cached:
        run()
    with pytest.raises(DataError) as direct:
        load_pairs(bad, make_format(registry, run.config))
    assert cached.value.problems == direct.value.problems and not cache_files(run)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('no') }}"
    run = Run(tmp_path, registry, dataset=str(data[0]))
    with pytest.raises(DataError, match="train.jsonl:1: field 'prompt': the chat template failed"):
        run(tokenizer)
    assert not cache_files(run)


def test_a_file_that_changes_while_it_is_read_is_not_cached(tmp_path: Path, data: tuple[Path, Path]) -> None:
    train = data[0]
    lines: list[str] = []
    parts = {"dataset_sha256": file_sha256(train)}

    def build(tokens_file: Path) -> Tokenized:
        train.write_text(train.read_text() + "\n")
        return Tokenized(PairTable.of([]), TokenizeReport(), "x")

    load_or_build(tmp_path / "c.pt", parts, build, [str(train)], lines.append,
                  lambda: {"dataset_sha256": file_sha256(train)})
    assert "changed while it was read" in lines[0] and not (tmp_path / "c.pt").exists()


def test_the_default_cache_dir_is_used_and_an_unwritable_cache_is_only_skipped(
    tmp_path: Path, registry: Any, data: tuple[Path, Path]
) -> None:
    run = Run(tmp_path, registry, dataset=str(data[0]), cache_dir=None)
    first = run()
    assert list((tmp_path / "cache" / "tokenized").glob("*.pt"))  # $PREFTUNE_CACHE_DIR (conftest)
    (tmp_path / "blocked").write_text("a file where the cache directory would be")
    run = Run(tmp_path, registry, dataset=str(data[0]), cache_dir=str(tmp_path / "blocked"))
    uncached = run()  # its tokens mapped from an unlinked temporary file: still readable
    assert list(uncached.pairs) == list(first.pairs) and len(first.pairs) == 21  # 9 dropped at 64
    assert "; not cached" in run.log and "cannot write" in run.log
