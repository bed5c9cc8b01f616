"""``preftune export``: a finished run's weights as a plain Hugging Face model directory.

The run's ``config.json`` says which backend trained it and on what; that backend's factory does
the work through its optional ``export(config, options, final, out)`` (the ``local`` backend
merges a LoRA adapter into its base model). The output is written into a temporary directory
beside ``out`` and renamed into place when complete, so ``out`` is whole or absent.
"""

from __future__ import annotations

from pathlib import Path

from .config import load_config
from .errors import ConfigError
from .fileio import atomic_dir, remove_stale
from .manager import Registry
from .messages import log


def export_run(run_dir: Path, out: Path, registry: Registry) -> Path:
    """Write the merged model of the finished run in ``run_dir`` to ``out``; returns ``out``."""
    config_file, final = run_dir / "config.json", run_dir / "final"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a preftune run directory: it has no config.json")
    if not final.is_dir():
        raise ConfigError(f"{final}: no such directory; export reads a finished run's final weights")
    check_out(out)
    config = load_config(config_file)
    component = registry.get("backend", config.backend)
    export = getattr(component.factory, "export", None)
    if not callable(export):
        raise ConfigError(f"run {run_dir} was trained by backend {config.backend!r}, which cannot "
                          "export merged weights")
    options = config.options_for(config.backend, component.options) if component.options else None
    removed = remove_stale(out.parent, [f".{out.name}.*"])  # what an interrupted export left
    if removed:
        log(f"removed what an interrupted export left behind: {', '.join(map(str, removed))}")
    with atomic_dir(out) as tmp:
        export(config, options, final, tmp)
    return out


def check_out(out: Path) -> None:
    """``out`` must not exist, or be an empty directory: an export never overwrites files."""
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} exists and is not empty; choose a new one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file; export writes a directory")
