"""``[local] threads = 0``: the idle cores when the run starts. The rule on fabricated loads,
cores and quotas; the readers on fabricated ``/proc/stat`` and ``cpu.max`` files and on this
machine; the backend says what it picked, and a resumed run keeps its checkpoint's count."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import ConfigError
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.plugins.local_threads import (
    allowed_cpus,
    busy_between,
    busy_cores,
    cpu_quota,
    cpu_times,
    machine_threads,
    pick_threads,
)


@pytest.mark.parametrize("cores, busy, quota, threads", [
    (2, 0.0, None, 2),  # a quiet machine: every core
    (2, 0.4, None, 2),  # a shell, an editor: 1.6 idle cores round to 2
    (2, 0.6, None, 1),  # 1.4 idle round to 1
    (2, 1.0, None, 1),  # a test suite on one core
    (2, 2.0, None, 1),  # all busy: still one thread
    (2, 5.0, None, 1),  # a load average beyond the cores
    (16, 3.2, None, 13),
    (16, 3.2, 4.0, 4),  # the cgroup quota caps what is idle on the host
    (16, 14.5, 4.0, 2),
    (8, 0.0, 2.5, 2),  # a fractional quota: the whole CPUs in it
    (8, 0.0, 0.5, 1),
    (4, None, None, 4),  # load unknown: the usable cores
    (4, None, 3.0, 3),
])
def test_the_idle_cores_rounded_capped_by_the_quota_and_at_least_one(
        cores: int, busy: float | None, quota: float | None, threads: int) -> None:
    assert pick_threads(cores, busy, quota) == threads


@pytest.mark.parametrize("text, quota", [("max 100000\n", None), ("200000 100000\n", 2.0),
                                         ("150000 100000", 1.5), ("", None), ("garbage", None)])
def test_the_cgroup_quota_is_read_in_cpus(tmp_path: Path, text: str, quota: float | None) -> None:
    (tmp_path / "cpu.max").write_text(text)
    assert cpu_quota(tmp_path / "cpu.max") == quota


def test_no_cgroup_file_means_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path / "missing") is None


STAT = """cpu  {all}
cpu0 {c0} 0 0 {i0} {w0} 0 0 0 0 0
cpu1 {c1} 0 0 {i1} 0 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""


def stat(tmp_path: Path, name: str, c0: int, i0: int, w0: int, c1: int,
         i1: int) -> dict[int, tuple[int, int]]:
    path = tmp_path / name
    path.write_text(STAT.format(all="1 2 3 4 5 6 7 8 9 10", c0=c0, i0=i0, w0=w0, c1=c1, i1=i1))
    return cpu_times(path)


def test_busy_cores_come_from_the_idle_share_of_each_cpu_between_two_samples(tmp_path: Path) -> None:
    before = stat(tmp_path, "a", c0=100, i0=1000, w0=10, c1=500, i1=500)
    assert before == {0: (1010, 1110), 1: (500, 1000)}  # iowait counts as idle
    after = stat(tmp_path, "b", c0=120, i0=1000, w0=10, c1=505, i1=520)  # cpu0 all busy, cpu1 1/5
    assert busy_between(before, after, [0, 1]) == pytest.approx(1.2)
    assert busy_between(before, after, [1]) == pytest.approx(0.2)  # only the CPUs we may use
    assert busy_between(before, before, [0, 1]) == 0.0  # no tick elapsed


def test_this_machine_is_read() -> None:
    cpus = allowed_cpus()
    assert cpus and len(cpus) <= (os.cpu_count() or 1)
    busy = busy_cores(cpus)
    assert busy is not None and 0.0 <= busy <= len(cpus)
    threads, why = machine_threads()
    assert 1 <= threads <= len(cpus) and f"of {len(cpus)} cores idle" in why


@pytest.fixture
def keep_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_backend_says_what_it_picked_once(make_config: Any, tokenizer: Any, capsys: Any,
                                              keep_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS")  # a user's default: the machine's idle cores
    backend = LocalBackend(make_config(device="cpu"), LocalOptions(), tokenizer)
    said = [line for line in capsys.readouterr().err.splitlines() if "CPU thread" in line]
    assert len(said) == 1 and "(threads = 0: " in said[0]
    assert said[0].split("local backend: ")[1].startswith(f"{torch.get_num_threads()} CPU thread")
    backend.close()


def test_a_resumed_run_uses_the_thread_count_of_its_checkpoint(make_config: Any, tokenizer: Any,
                                                               tmp_path: Path, capsys: Any,
                                                               keep_threads: None) -> None:
    backend = LocalBackend(make_config(device="cpu"), LocalOptions(), tokenizer)
    saved = torch.get_num_threads()
    backend.save_state(str(tmp_path / "state"))
    other = 2 if saved == 1 else 1
    torch.set_num_threads(other)  # as a resumed run on a machine with another load would pick
    capsys.readouterr()
    backend.load_state(str(tmp_path / "state"))
    assert torch.get_num_threads() == saved
    assert f"{saved} CPU thread" in capsys.readouterr().err
    torch.set_num_threads(other)
    LocalBackend(make_config(device="cpu"), LocalOptions(threads=other), tokenizer).load_state(
        str(tmp_path / "state"))
    assert torch.get_num_threads() == other  # a count set in the config is kept
    (tmp_path / "state" / "threads.json").write_text("{")
    with pytest.raises(ConfigError, match="has a damaged threads.json"):
        backend.load_state(str(tmp_path / "state"))
