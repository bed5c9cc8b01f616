"""Checkpoints: everything a killed run needs to continue exactly where it stopped.

A checkpoint is a directory ``log_path/checkpoints/step-NNNNNNNN/`` written under a temporary name
and renamed into place when complete, so a directory with that name is always whole. It holds the
backend's state (weights or adapter and optimizer), the RNG states, and ``trainer_state.json``
(step, tokens, elapsed time, the first evaluation, and hashes of the config and the data). The
position in the data is a function of the step, because the data order is a pure function of
seed and epoch.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, PreftuneError
from .fileio import atomic_dir
from .messages import log

STATE_FILE = "trainer_state.json"
# Fields that do not change what is trained: a run may resume with other values for them.
NOT_TRAINING = {"log_path", "cache_dir", "resume", "sinks", "checkpoint_interval",
                "keep_checkpoints", "eval_interval", "eval_samples", "eval_sample_tokens", "device"}


def training_hash(config: Any, ignore_tables: set[str], ignore_keys: set[str] = frozenset()) -> str:
    """sha256 of every setting that changes the trajectory of training: not the tables of
    ``ignore_tables`` (sinks), nor the ``table.key`` options of ``ignore_keys`` (how long to wait
    for a service, how often to retry), which a resumed run may change."""
    data = config.model_dump(mode="json")
    kept = {k: v for k, v in data.items() if k not in NOT_TRAINING | ignore_tables}
    for dotted in ignore_keys:
        table, _, key = dotted.partition(".")
        if isinstance(kept.get(table), dict):
            kept[table] = {k: v for k, v in kept[table].items() if k != key}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def root(log_path: str | Path) -> Path:
    return Path(log_path) / "checkpoints"


def save(log_path: str | Path, step: int, backend: Any, state: dict[str, Any],
         keep: int, world: Any = None) -> Path:
    """Write checkpoint ``step`` atomically, then delete the older ones beyond ``keep`` (never
    the one just written, nor one from a later step), and tell the backend it is whole. Under
    several processes (``world``) every rank calls the backend's ``save_state`` with the same
    directory and writes its part."""
    path = root(log_path) / f"step-{step:08d}"
    if world is None or world.size == 1:
        with atomic_dir(path) as tmp:
            write(Path(tmp), backend, state, step)
        prune(log_path, path, keep)
    else:
        save_ranks(path, step, backend, state, keep, world, log_path)
    whole(backend, path)
    return path


def save_ranks(path: Path, step: int, backend: Any, state: dict[str, Any], keep: int, world: Any,
               log_path: str | Path) -> None:
    """:func:`save` under several processes: the main rank makes the temporary directory; every
    rank writes its part of the backend's state into it (``save_state`` on every rank: a sharded
    state's shards), the main rank the rest; then it renames the directory. An error anywhere
    stops every rank."""
    rngs = world.gather(rng_state())  # each rank's generators (LoRA dropout draws its own)
    holder = atomic_dir(path)
    tmp = Path(world.broadcast(world.first(f"making checkpoint {path}", holder.__enter__)))
    what = f"writing checkpoint {path}"
    if not world.is_main:
        with world.collective(what):
            backend.save_state(str(tmp / "backend"))
        world.first(what, lambda: None)
        return

    def finish() -> None:
        try:
            write(tmp, backend, state, step, rngs)
        except BaseException as exc:
            holder.__exit__(type(exc), exc, exc.__traceback__)  # removes it; a full disk named
            raise
        holder.__exit__(None, None, None)
        prune(log_path, path, keep)

    world.first(what, finish)


def whole(backend: Any, path: Path) -> None:
    """Tell a backend that asks (``checkpoint_saved(path)``, optional) that checkpoint ``path``
    is whole on disk: what it saved there may now replace what the older ones need."""
    saved = getattr(backend, "checkpoint_saved", None)
    if callable(saved):
        saved(str(path))


def write(tmp: Path, backend: Any, state: dict[str, Any], step: int,
          ranks: list[dict[str, Any]] | None = None) -> None:
    """The files of a checkpoint, into its temporary directory ``tmp`` (``ranks``: the random
    generators of every rank, when there are several)."""
    backend.save_state(str(tmp / "backend"))
    with open(tmp / "rng.pt", "wb") as handle:  # a handle: torch keeps the OS's error
        torch.save({**rng_state(), **({"ranks": ranks} if ranks else {})}, handle)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))


def prune(log_path: str | Path, path: Path, keep: int) -> None:
    """Delete the checkpoints older than ``path`` beyond ``keep`` (never ``path`` itself, nor one
    from a later step)."""
    older = [p for p in complete(log_path) if p.name < path.name]
    for old in older[: max(len(older) - (keep - 1), 0)] if keep > 0 else []:
        doomed = old.with_name(f".{old.name}.pruned")  # a kill mid-delete leaves a temporary name
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def complete(log_path: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with a dot)."""
    if not root(log_path).is_dir():
        return []
    return sorted(p for p in root(log_path).glob("step-*") if (p / STATE_FILE).exists())


class Unreadable(PreftuneError):
    """A checkpoint that cannot be read back (truncated or damaged, or a file missing)."""

    def __init__(self, path: Path, error: BaseException | str):
        why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        super().__init__(f"checkpoint {path} is unreadable ({why})")


def check_fresh(log_path: str | Path) -> None:
    """A run that does not resume must not mix its checkpoints with an earlier run's."""
    found = complete(log_path)
    if found:
        raise ConfigError(f"log_path {log_path} holds checkpoints of an earlier run (newest: "
                          f"{found[-1].name}): continue it with --resume, or use a new log_path")


SUMMARY = "summary.json"


def check_resumable(log_path: str | Path) -> None:
    """``--resume`` of a run that completed (and whose ``final/`` is still there) would change
    what it wrote (a second evaluation of its last step): refused, before anything loads."""
    file = Path(log_path) / SUMMARY
    if not (Path(log_path) / "final").is_dir():
        return  # its final weights are gone: a resume writes them again
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # none (the run never ended) or unreadable: resume from its checkpoints
    if isinstance(summary, dict) and summary.get("status") == "completed":
        raise ConfigError(f"log_path {log_path} holds a run that completed at step "
                          f"{summary.get('steps')} ({file}): there is nothing to resume; to train "
                          f"further, start a new log_path with init_from = '{Path(log_path) / 'final'}'")


def resume(log_path: str | Path, backend: Any, expect: dict[str, str],
           world: Any = None) -> dict[str, Any]:
    """Restore the newest readable checkpoint of ``log_path``; its trainer state, or {} when there
    is none. An unreadable one is skipped, and the log names it; when every one is unreadable,
    a :class:`ConfigError` names each with its reason."""
    found = sorted((p for p in root(log_path).glob("step-*") if p.is_dir()), reverse=True)
    if not found:
        log(f"resume: no checkpoint in {root(log_path)}; starting from step 0")
        return {}
    skipped = []
    for path in found:
        try:
            state = restore(path, backend, expect, world)
        except Unreadable as exc:
            log(f"resume: skipping {exc}")
            skipped.append(str(exc))
            continue
        log(f"resumed from {path} (step {state['step']})")
        return state
    raise ConfigError(f"cannot resume: no readable checkpoint in {root(log_path)}:\n"
                      + "\n".join(skipped))


def restore(path: Path, backend: Any, expect: dict[str, str], world: Any = None) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``backend``; refuse one made for other settings or data
    (:class:`ConfigError`); :class:`Unreadable` when it cannot be read."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError(f"{STATE_FILE} holds no step")
    except (OSError, ValueError) as exc:
        raise Unreadable(path, exc) from exc
    for key, value in expect.items():
        if state.get(key) != value:
            what = "training settings" if key == "config_sha256" else "training data"
            raise ConfigError(
                f"checkpoint {path} was written for different {what} ({key} differs); "
                "resume with the settings and data it was made with, or use a new log_path"
            )
    try:
        rng = torch.load(path / "rng.pt", weights_only=True)
        # last: a failure part-way leaves the backend half-loaded, and the next (older)
        # checkpoint's load_state then sets all of it again
        backend.load_state(str(path / "backend"))
    except Exception as exc:
        raise Unreadable(path, exc) from exc
    ranks = rng.get("ranks") or []
    if world is not None and len(ranks) == world.size:  # the same number of processes: each
        rng = ranks[world.rank]  # rank goes on with its own generators; else rank 0's
    set_rng_state(rng)
    return state


def rng_state() -> dict[str, Any]:
    """The random number generators' states: Python's, torch's CPU one, and each CUDA device's
    when CUDA is in use (dropout on a GPU draws from the device's generator)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (a checkpoint without CUDA states leaves them be; a
    machine with fewer devices restores those it has)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
