"""The local backend's state on disk: what an exact resume saves and loads (weights or adapter,
the optimizer, fp16-mixed's loss scale, the CPU thread count; FSDP's shards with
``torch.distributed.checkpoint``), and the weight snapshots ``weight_sync`` publishes to a
directory. Functions of the backend (``plugins/local.py``), which keeps the verbs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from preftune import ConfigError, TrainingError, log
from preftune.backend_utils import atomic_dir, files_hash, remove_stale, switch_symlink
from preftune.plugins.local_engine import Logps
from preftune.plugins.local_parallel import (
    full_state,
    is_sharded,
    load_full_state,
    load_sharded,
    save_sharded,
)
from preftune.plugins.local_precision import all_finite
from preftune.plugins.local_threads import cpu_threads

if TYPE_CHECKING:
    from preftune.plugins.local import LocalBackend

THREADS_FILE = "threads.json"  # in a CPU checkpoint: the threads the run used, for an exact resume


def save_state(b: LocalBackend, path: str) -> None:
    """The weights (or adapter), the optimizer's state and what else an exact resume needs.
    Under several processes every rank is called with the same ``path``: under FSDP each
    writes its shards with ``torch.distributed.checkpoint`` (a run resumes from them on any
    number of processes, one included); under DDP the main rank writes its copy."""
    if b.parallel == "fsdp":
        _check_shards(b)
        save_sharded(_state_module(b), b.optimizer, path)
    elif not b.world.is_main:
        return  # DDP: the main rank's copy is every rank's
    else:
        b.check_weights()
        Path(path).mkdir(parents=True, exist_ok=True)
        b.model.save_pretrained(path)
        with open(Path(path) / "optimizer.pt", "wb") as handle:  # a handle keeps the OS's error
            torch.save(b.optimizer.state_dict(), handle)
    if not b.world.is_main:
        return
    if b.stepper.scaler is not None:  # fp16-mixed: the loss scale and its growth tracker
        with open(Path(path) / "scaler.pt", "wb") as handle:
            torch.save(b.stepper.state_dict(), handle)
    if b.device.type == "cpu":  # the thread count changes float sums' rounding
        (Path(path) / THREADS_FILE).write_text(json.dumps({"threads": torch.get_num_threads()}))


def _check_shards(b: LocalBackend) -> None:
    """:meth:`check_weights` over every rank's shards (each rank raises, or none does)."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach()
             for p in b.model.parameters()]
    if b.world.sum([float(not all_finite(local))])[0]:
        raise TrainingError("a weight holds NaN or infinite values; not saved")


def _state_module(b: LocalBackend) -> torch.nn.Module:
    """What sharded states are keyed by: the wrapper (``lm.`` + the model's names), the same
    with one process or several."""
    return b.runner if b.runner is not None else Logps(b.model, b.plan)


def load_state(b: LocalBackend, path: str) -> None:
    if is_sharded(path):  # written under FSDP: resharded for this number of processes
        load_sharded(_state_module(b), b.optimizer, path)
    else:
        _load_files(b, path)
    if b.stepper.scaler is not None:
        if not (Path(path) / "scaler.pt").exists():
            raise ConfigError(f"state {path} lacks scaler.pt (the fp16-mixed loss scale)")
        b.stepper.load_state_dict(torch.load(Path(path) / "scaler.pt", map_location=b.device,
                                                weights_only=True))
    _resume_threads(b, Path(path) / THREADS_FILE)


def _load_files(b: LocalBackend, path: str) -> None:
    """A state one process (or DDP's main rank) wrote: safetensors and ``optimizer.pt``."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no weights (*.safetensors) in state directory {path}")
    weights = {k: v for f in files for k, v in load_file(str(f)).items()}
    # the state's device: the parameters' (FSDP shards it from the CPU); torch moves only
    # some of it itself (a non-fused optimizer's step counts stay where they were loaded)
    where = "cpu" if b.parallel == "fsdp" else b.device
    optimizer = torch.load(Path(path) / "optimizer.pt", map_location=where, weights_only=True)
    if b.parallel == "fsdp":  # every rank reads the full state and keeps its shards
        load_full_state(b.runner, b.optimizer, _trainable_names(b),
                        _model_keys(b, weights, path), optimizer)
    else:
        _load_whole(b, weights, optimizer, path)


def _trainable_names(b: LocalBackend) -> list[str]:
    """The names of the parameters that train, in the optimizer's order."""
    return [n for n, p in b.model.named_parameters() if p.requires_grad]


def _model_keys(b: LocalBackend, weights: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Saved weights under the model's own parameter names (peft saves an adapter without
    its adapter's name)."""
    names = [n for n, _ in b.model.named_parameters()]  # a tied weight once
    adapter = getattr(b.model, "active_adapter", None)
    saved = {n.replace(f".{adapter}.", ".") if adapter else n: n for n in names}
    unknown = [k for k in weights if k not in saved]
    if unknown:
        raise ConfigError(f"state {path} does not match the model: {unknown[:5]}")
    named = {saved[k]: v for k, v in weights.items()}
    needed = _trainable_names(b) if adapter else names  # an adapter holds what trains
    missing = [n for n in needed if n not in named]
    if missing:
        raise ConfigError(f"state {path} lacks weights for {missing[:5]}")
    return named


def _load_whole(b: LocalBackend, weights: dict[str, torch.Tensor], optimizer: dict[str, Any],
                path: str) -> None:
    if hasattr(b.model, "disable_adapter"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(b.model, weights)
    else:
        result = b.model.load_state_dict(weights, strict=False)
        tied = getattr(b.model.config, "tie_word_embeddings", False)
        missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
        if missing:
            raise ConfigError(f"state {path} lacks weights for {missing[:5]}")
    if result.unexpected_keys:
        raise ConfigError(f"state {path} does not match the model: {result.unexpected_keys[:5]}")
    b.optimizer.load_state_dict(optimizer)  # moves the state to the parameters' device


def _resume_threads(b: LocalBackend, file: Path) -> None:
    """With ``threads = 0``, the thread count the resumed run used (a different count
    rounds float sums differently, and resume is exact), said once."""
    if b.device.type != "cpu" or b.options.threads or not file.exists():
        return
    try:
        threads = int(json.loads(file.read_text())["threads"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"state {file.parent} has a damaged {THREADS_FILE}") from None
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log(f"local backend: {cpu_threads(threads)}, as the run being resumed used (exact resume)")


def publish_weights(b: LocalBackend, snapshot: str, step: int, deployment_id: str,
                    directory: str | None, keep: int) -> dict[str, Any]:
    """Write ``directory/snapshots/<snapshot>`` (weights, tokenizer, manifest.json), then
    switch ``directory/current`` to it atomically and prune old snapshots. A server that
    resolves ``current`` once per load never sees a half-written snapshot. Under several
    processes every rank calls it (the sink runs on every rank); under FSDP they all take part
    in gathering the weights, and the main rank writes."""
    if directory is None:
        raise ConfigError("the local backend publishes to a directory: set [weight_sync] directory")
    state = full_state(b.runner, b.model, b.parallel)
    if not b.world.is_main:
        return {}
    b.check_weights(state)
    root = Path(directory)
    removed = remove_stale(root / "snapshots", [".*"])  # interrupted publishes
    if removed:
        log(f"removed what interrupted publishes left behind: {', '.join(map(str, removed))}")
    with atomic_dir(root / "snapshots" / snapshot) as tmp:
        b.model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
        b.tokenizer.save_pretrained(tmp)
        manifest = {"snapshot": snapshot, "step": step, "deployment_id": deployment_id,
                    "base_model": b.config.base_model, "init_from": b.config.init_from,
                    "kind": "adapter" if b.config.lora_rank > 0 else "full",
                    "sha256": files_hash(Path(tmp)), "created": time.time()}
        (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    switch_symlink(root / "current", Path("snapshots") / snapshot)
    snapshots = sorted(p for p in (root / "snapshots").iterdir() if not p.name.startswith("."))
    for old in snapshots[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return manifest

