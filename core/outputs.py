"""What a run writes never is, holds or lies inside what it reads.

A run writes files and directories under ``log_path`` (and its caches under ``cache_dir``); a
plugin may write elsewhere (``[weight_sync] directory``). :func:`check_outputs` compares their real
paths (symlinks and ``..`` resolved) with the run's inputs before anything is written, so logging
into the folder that holds the data (``log_path = "exp"`` beside ``exp/eval.jsonl``) is refused,
naming both settings, instead of replacing the user's held-out pairs with evaluation rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

# what a run (or ``preftune report`` on it) writes into log_path: name -> who writes it
LOG_FILES = {
    "config.json": "the run's resolved config", "metrics.jsonl": "the jsonl sink's step rows",
    "eval.jsonl": "the jsonl sink's evaluation rows", "summary.json": "the run's summary",
    "skipped.jsonl": "the records the run skipped", ".preftune.lock": "the run's lock",
    "fireworks_jobs.json": "the fireworks backend's job list", "report.html": "preftune report",
    **{f"{stem}.png": "preftune report's plots" for stem in (
        "loss", "margin", "accuracy", "rewards", "eval_accuracy", "log_odds_ratio")},
}
LOG_DIRS = {"final": "the final weights, replaced whole", "checkpoints": "checkpoints, pruned",
            "deployments": "the weight_sync sink's snapshots, pruned"}
CACHE_DIRS = ("reference", "tokenized")


@dataclass(frozen=True)
class Output:
    """A path a run writes: what writes it, and the setting that decides where it is."""

    path: Path
    what: str
    key: str


@dataclass(frozen=True)
class Input:
    """A path a run reads: the setting that names it; ``tree`` when writing anywhere inside it
    changes it (a model directory, whose identity is its files)."""

    path: Path
    key: str
    tree: bool = False


def run_outputs(config: Any, cache_dir: Path) -> list[Output]:
    """What the core and the built-in sinks and backends write for ``config``."""
    log = Path(config.log_path)
    out = [Output(log / name, what, "log_path") for name, what in LOG_FILES.items()]
    out += [Output(log / name, what, "log_path") for name, what in LOG_DIRS.items()]
    out += [Output(cache_dir / name, f"the {name} cache", "cache_dir") for name in CACHE_DIRS]
    return out


def run_inputs(config: Any, cache_dir: Path) -> list[Input]:
    """What a run reads: its data files, its config file, local model directories, the cache."""
    inputs = [Input(Path(config.dataset), "dataset")] if config.dataset else []
    if config.eval_dataset:
        inputs.append(Input(Path(config.eval_dataset), "eval_dataset"))
    source = getattr(config, "source_file", None)
    if source:
        inputs.append(Input(Path(source), "the config file"))
    for key in ("base_model", "tokenizer_model", "init_from"):
        name = getattr(config, key)
        if name and Path(name).is_dir():  # a hub id is no path of this machine
            inputs.append(Input(Path(name), key, tree=True))
    inputs.append(Input(cache_dir, "cache_dir"))
    return inputs


def check_outputs(config: Any, cache_dir: Path, extra: Iterable[Output] = ()) -> None:
    """Refuse, before anything is written, an output that is an input, holds one, or lies
    inside an input directory whose files identify a model."""
    inputs = [(i, real(i.path)) for i in run_inputs(config, cache_dir)]
    for output in [*run_outputs(config, cache_dir), *extra]:
        target = real(output.path)
        for given, source in inputs:
            if given.key == "cache_dir" and output.key == "cache_dir":
                continue  # the caches live in cache_dir by design
            relation = clash(target, source, given.tree)
            if relation:
                raise ConfigError(
                    f"{output.key}: the run writes {output.path} ({output.what}), which {relation} "
                    f"{given.key} {given.path}; set {output.key} elsewhere or move {given.key} "
                    "(nothing was written)")


def clash(target: Path, source: Path, tree: bool) -> str | None:
    """How writing ``target`` would change ``source`` ("is", "holds", "is inside"), or None."""
    if target == source:
        return "is"
    if target in source.parents:
        return "holds"
    if tree and source in target.parents:
        return "is inside"
    return None


def real(path: Path) -> Path:
    """``path`` with symlinks and ``..`` resolved as far as it exists (a dangling link is
    followed to where it points)."""
    return Path(path).expanduser().resolve(strict=False)
