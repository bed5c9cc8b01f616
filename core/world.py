"""The processes of one run: one (``preftune run``), or several started by ``torchrun``.

:func:`make_world` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) when the
run starts, before the lock, the tokenized-data cache and the sinks, and the run hands the
:class:`World` to the loop and the backend. A world of one needs no process group and every
method here is then free: the single-process path pays nothing.

Several processes share one process group (gloo for the CPU tensors here; NCCL too on a CUDA
machine, for the backend's gradients). Work only the main rank does (the lock, a cache file,
``config.json``, the sinks) goes through :meth:`World.first`: the main rank does it while the
others wait, and an error there is raised on every rank, so no rank waits for a step that will
never come. A rank that dies makes the others' next collective fail: :meth:`World.lost` names it.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from . import messages
from .errors import ConfigError, PreftuneError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer ends the run (a hung rank)
POLL_S = 0.05  # how often a rank waiting for the main rank's work looks at the store


class RankError(PreftuneError):
    """This rank cannot go on: another rank failed, died or stopped answering."""


@dataclass
class World:
    """Rank ``rank`` of ``size`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restarts: int = 0  # torchrun --max-restarts: how many times this job was restarted
    timeout_s: float = DEFAULT_TIMEOUT_S
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, PID) of each rank
    _turn: int = 0  # a counter naming each :meth:`first`, equal on every rank
    store: Any = None  # the rendezvous store (several processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """``rank N: `` before an error under several processes, else nothing."""
        return f"rank {self.rank}: " if self.size > 1 else ""

    def share(self, batch: Sequence[int]) -> tuple[list[int], bool]:
        """This rank's part of ``batch`` (near-equal contiguous parts, in rank order) and whether
        it is a stand-in: a rank whose part would be empty takes the batch's first pair, to be
        weighted 0, so that every rank runs the same passes (DDP's all-reduce and FSDP's
        all-gathers wait for every rank)."""
        if self.size == 1:
            return list(batch), False
        base, extra = divmod(len(batch), self.size)
        start = self.rank * base + min(self.rank, extra)
        part = list(batch[start : start + base + (self.rank < extra)])
        return (part, False) if part else ([batch[0]], True)

    # ---- collectives -------------------------------------------------------------------------

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sums of ``values`` over the ranks (float64)."""
        if self.size == 1:
            return [float(v) for v in values]
        total = torch.tensor([float(v) for v in values], dtype=torch.float64)
        with self.collective("summing metrics"):
            torch.distributed.all_reduce(total)
        return total.tolist()

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order, on every rank (small Python objects)."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        with self.collective("gathering results"):
            torch.distributed.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """The main rank's ``value`` on every rank (a small Python object)."""
        if self.size == 1:
            return value
        box = [value]
        with self.collective("receiving the main rank's answer"):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def first(self, what: str, work: Callable[[], T]) -> T | None:
        """Run ``work`` on the main rank while the others wait for it; return its value there
        (None on the others). An error there is raised on every rank (here as a
        :class:`RankError` that names it), so no rank goes on alone. The wait has no time limit
        (building a cache of a million pairs takes minutes): it ends when the main rank answers,
        or fails when it is gone."""
        if self.size == 1:
            return work()
        self._turn += 1
        key = f"first/{self._turn}"
        store = self.store
        if self.is_main:
            try:
                value = work()
            except BaseException as exc:
                store.set(key, pickle.dumps(f"{type(exc).__name__}: {exc}"))
                raise
            store.set(key, pickle.dumps(None))
            return value
        while True:
            try:
                if store.check([key]):
                    error = pickle.loads(store.get(key))
                    break
            except Exception as exc:  # the store lived in the main rank's process
                raise RankError(f"{self.tag}the main rank is gone while {what} ({exc})") from None
            time.sleep(POLL_S)
        if error is not None:
            raise RankError(f"{self.tag}the main rank failed while {what}: {error}")
        return None

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn the failure of a collective (a rank that died, a timeout) into a
        :class:`RankError` that says which rank is gone, where that can be known."""
        try:
            yield
        except PreftuneError:
            raise
        except Exception as exc:
            if self.size == 1 or not self.is_collective_failure(exc):
                raise
            raise RankError(f"{self.tag}{self.lost()} while {what} ({first_line(exc)})") from None

    def is_collective_failure(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a failed collective (torch raises plain RuntimeErrors for gloo)."""
        if isinstance(exc, getattr(torch.distributed, "DistError", ())):
            return True
        text = str(exc)
        return any(mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed",
                                             "timed out", "Timed out")) or bool(self.gone())

    def gone(self) -> list[int]:
        """Ranks on this machine whose process no longer exists."""
        host = socket.gethostname()
        missing = []
        for rank, (where, pid) in enumerate(self.peers):
            if rank != self.rank and where == host and not alive(pid):
                missing.append(rank)
        return missing

    def lost(self) -> str:
        """Which rank is gone, in words."""
        missing = self.gone()
        if missing:
            return "lost " + ", ".join(f"rank {r} (PID {self.peers[r][1]}, no longer running)"
                                       for r in missing)
        return ("lost contact with another rank (it died, was killed or stopped answering within "
                f"dist_timeout_s = {self.timeout_s:g}; torchrun's report names it)")

    def close(self, wait: bool = True) -> None:
        """Leave the process group: after the others are done with it (``wait``), or at once
        when this rank failed (the others may wait in a collective this rank never reaches; its
        exit makes theirs fail at once)."""
        if self.size > 1 and torch.distributed.is_initialized():
            if wait:
                try:
                    torch.distributed.barrier()
                except Exception:
                    pass  # another rank is gone: leave anyway
            torch.distributed.destroy_process_group()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): it answered the signal


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def world_env() -> tuple[int, int, int]:
    """(rank, size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers ({exc})") from None
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK {rank} is not a rank of WORLD_SIZE {size}")
    return rank, size, local


def make_world(timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """The world this process is part of; with several processes, the process group is made
    (``timeout_s`` bounds every collective) and messages come from the main rank only."""
    rank, size, local = world_env()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    world = World(rank, size, local, restarts, timeout_s)
    if size == 1:
        return world
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(f"WORLD_SIZE is {size} but {name} is not set: start the run with torchrun")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store, _, _ = next(torch.distributed.rendezvous("env://", timeout=timeout))
        # keys of its own per torchrun restart: a restarted job never reads the last attempt's
        world.store = torch.distributed.PrefixStore(f"preftune/{restarts}", store)
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout,
                                             store=world.store, rank=rank, world_size=size)
    except Exception as exc:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise RankError(f"rank {rank}: could not join the other {size - 1} process(es) at {where}: "
                        f"{first_line(exc)}") from None
    messages.set_rank(rank, size)
    world.peers = [tuple(p) for p in world.gather((socket.gethostname(), os.getpid()))]
    return world
