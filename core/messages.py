"""Progress messages: one line each, to stderr, so stdout stays for results. Under several
processes only the main rank says them (an error is said by every rank, tagged with it)."""

from __future__ import annotations

import sys

from .secrets import mask_secrets

_rank = 0
_ranks = 1


def set_rank(rank: int, size: int) -> None:
    """This process's rank of ``size``: messages come from rank 0 only."""
    global _rank, _ranks
    _rank, _ranks = rank, size


def processes() -> int:
    """How many processes the run has (torchrun's WORLD_SIZE once the world is made)."""
    return _ranks


def tag(text: str) -> str:
    """``text`` as an error of this rank says it: ``rank N: text`` under several processes."""
    prefix = f"rank {_rank}: "
    return text if _ranks == 1 or text.startswith(prefix) else prefix + text


def quiet() -> bool:
    """Whether this process says nothing (a rank other than the main one)."""
    return _rank != 0


def log(message: str) -> None:
    """Print ``[preftune] message`` to stderr, any secret in it masked (on the main rank)."""
    if _rank == 0:
        print(f"[preftune] {mask_secrets(message)}", file=sys.stderr, flush=True)
