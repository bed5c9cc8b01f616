"""preftune: a small, pluggable trainer for preference optimization of language models.

Public API: ``Config`` and ``run`` to train; ``hookimpl`` and the data types and Protocols below
to write plugins. Everything else is internal.
"""

from .config import Config, load_config
from .data import check_pair, tokenize_pair
from .errors import ConfigError, DataError, PluginError, PreftuneError, RecordError, TrainingError
from .fileio import atomic_dir, atomic_torch_save, atomic_write_json, switch_symlink
from .hookspecs import hookimpl
from .hub import files_hash, load_causal_lm, load_tokenizer, model_identity, resolve_init
from .loop import run
from .manager import get_plugin_manager, get_registry
from .messages import log
from .types import (
    AdamParams,
    Backend,
    DatasetFormat,
    ForwardClient,
    Loss,
    LossFn,
    Message,
    Metrics,
    PairLogps,
    PreferencePair,
    PublishingBackend,
    ReferenceProvider,
    Source,
    TokenizedPair,
    TokenLogps,
)

__all__ = [
    "AdamParams", "Backend", "Config", "ConfigError", "DataError", "DatasetFormat",
    "ForwardClient", "Loss", "LossFn", "Message", "Metrics", "PairLogps", "PluginError",
    "PreferencePair", "PreftuneError", "PublishingBackend", "RecordError", "ReferenceProvider", "Source",
    "TokenLogps", "TokenizedPair", "TrainingError", "atomic_dir", "atomic_torch_save", "atomic_write_json",
    "check_pair", "log",
    "files_hash", "get_plugin_manager", "get_registry", "hookimpl", "load_causal_lm", "load_config",
    "load_tokenizer", "model_identity", "resolve_init", "run", "switch_symlink", "tokenize_pair",
]
