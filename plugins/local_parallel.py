"""The ``local`` backend as several processes (``torchrun``): PyTorch's DDP, or FSDP2's
``fully_shard``, around the module that computes the log-probs.

The wrapper goes around :class:`~preftune.plugins.local_engine.Logps` (the decoder and the output
layer as one module), so every forward runs through it and its hooks: DDP's gradient all-reduce,
FSDP's all-gathers and reduce-scatters. Both average gradients over the ranks (the loop weights
each rank's loss by the number of ranks to match). Gradients are synchronised once per optimizer
step, after the step's last micro-batch (``no_sync`` / ``set_requires_gradient_sync``).

``fsdp`` shards parameters, gradients and optimizer state, one ``fully_shard`` per decoder layer
and one for the rest; its mixed-precision policy follows ``precision`` (parameters gathered in
the compute dtype, gradients reduced in float32). Its checkpoints are
``torch.distributed.checkpoint`` directories, each rank writing its shards, which a run reads
back resharded on any number of processes (one included). ``final/`` and published weights are
gathered to the main rank and written as one process writes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions

from preftune import ConfigError

PARALLEL = ("ddp", "fsdp")


def resolve_parallel(requested: str, size: int) -> str | None:
    """``auto``: DDP when there are several processes; None for one (nothing to wrap)."""
    if size == 1:
        return None
    return "ddp" if requested == "auto" else requested


def wrap(module: torch.nn.Module, parallel: str, layers: list[torch.nn.Module],
         compute: torch.dtype, master: torch.dtype) -> torch.nn.Module:
    """``module`` wrapped for ``parallel`` (its parameters already on this rank's device)."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if not any(p.requires_grad for p in module.parameters()):
            raise ConfigError("[local] parallel = 'ddp': the model has no parameter that trains")
        # buffers (rotary frequencies) are the same on every rank: nothing to sync per forward
        # (torch 2.13 renamed broadcast_buffers; older torch has only the old name)
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        return DistributedDataParallel(module, **{
            "forward_sync_buffers" if renamed else "broadcast_buffers": False})
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not layers:
        raise ConfigError("[local] parallel = 'fsdp': no stack of decoder layers found to shard")
    # parameters gathered in the compute dtype where they are all masters (a full fine-tune);
    # a LoRA base is stored in it already and its adapter stays float32 (autocast casts)
    uniform = len({p.dtype for p in module.parameters()}) == 1
    policy = MixedPrecisionPolicy(
        param_dtype=compute if compute != master and uniform else None, reduce_dtype=torch.float32,
        cast_forward_inputs=False)  # the layout's float weights are the loss's, not the model's
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


@contextmanager
def gradient_sync(runner: Any, parallel: str | None, syncs: bool) -> Iterator[None]:
    """Synchronise gradients after this backward only if ``syncs`` (the step's last
    micro-batch); before it they accumulate on each rank."""
    if parallel == "ddp" and not syncs:
        with runner.no_sync():
            yield
    elif parallel == "fsdp":
        runner.set_requires_gradient_sync(syncs)
        yield
    else:
        yield


def full_state(runner: Any, model: Any, parallel: str | None) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on the main rank (on the CPU), gathered from the shards
    with every rank taking part; None where the model itself holds it (one process, DDP)."""
    if parallel != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(runner, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    # a tied weight (lm_head = embeddings) once, as one process's model saves it
    return {k.removeprefix("lm."): v for k, v in state.items() if k.removeprefix("lm.") not in tied}


def save_sharded(module: Any, optimizer: Any, path: str) -> None:
    """The weights that train and the optimizer's state, each rank its shards, into ``path`` with
    ``torch.distributed.checkpoint`` (every rank calls it with the same directory)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)  # a LoRA base is the base model's
    weights, optim = get_state_dict(module, optimizer, options=options)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=path)


def load_sharded(module: Any, optimizer: Any, path: str) -> None:
    """Read what :func:`save_sharded` wrote into ``module`` and ``optimizer``, whatever the number
    of processes now (one: no process group; under DDP every rank reads all of it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    weights, optim = get_state_dict(module, optimizer, options=options)
    state = {"model": weights, "optim": optim}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=StateDictOptions(strict=False))


def is_sharded(path: str) -> bool:
    """Whether ``path`` holds a ``torch.distributed.checkpoint`` (its ``.metadata`` file)."""
    return (Path(path) / ".metadata").is_file()


def load_full_state(runner: Any, optimizer: Any, names: list[str], weights: dict[str, torch.Tensor],
                    optim: dict[str, Any]) -> None:
    """Set a full (one-process) state into the shards of every rank (FSDP)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(runner, {f"lm.{k}": v for k, v in weights.items()}, options=options)
    fqn = {i: f"lm.{name}" for i, name in enumerate(names)}
    named = {"state": {fqn[int(k)]: v for k, v in optim.get("state", {}).items()},
             "param_groups": [{**g, "params": [fqn[int(i)] for i in g["params"]]}
                              for g in optim.get("param_groups", [])]}
    set_optimizer_state_dict(runner, optimizer, named, options=StateDictOptions(full_state_dict=True))
