"""Helpers for backend authors: loading and identifying models, and writing files atomically.

``from preftune.backend_utils import ...``; the layouts of a micro-batch (padded, shared prompt)
are in :mod:`preftune.layout`. Users and loss, format or sink authors need none of this.
"""

from __future__ import annotations

from typing import Any

from .fileio import atomic_dir, atomic_torch_save, atomic_write_json, remove_stale, switch_symlink
from .hub import load_tokenizer, model_identity, tokenizer_identity
from .weights import (
    files_hash,
    files_identity,
    load_causal_lm,
    load_model_config,
    model_context,
    resolve_init,
    state_dict_hash,
)

__all__ = [
    "adamw", "atomic_dir", "atomic_torch_save", "atomic_write_json", "files_hash", "files_identity",
    "load_causal_lm", "load_model_config", "load_tokenizer", "model_context", "model_identity",
    "peak_rss_mb", "remove_stale", "resolve_init", "state_dict_hash", "switch_symlink", "tokenizer_identity",
]


def adamw(params: list[Any], lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float) -> Any:
    """``torch.optim.AdamW``, fused where torch has a fused kernel for the device (no per-step
    temporary copies of the parameters)."""
    import torch

    kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux and macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
