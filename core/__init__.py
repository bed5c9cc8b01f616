"""preftune: a small, pluggable trainer for preference optimization of language models.

Public API: ``Config`` and ``run`` to train; ``hookimpl``, the data types, the Protocols and the
errors below to write plugins, and ``mask_secrets`` for any message that may quote a setting's
value. Backend authors also have :mod:`preftune.backend_utils` and :mod:`preftune.layout`.
Everything else is internal.
"""

from .config import Config, load_config
from .data import tokenize_pair
from .errors import ConfigError, DataError, DiskError, PluginError, PreftuneError, RecordError, TrainingError
from .hookspecs import hookimpl
from .loop import run
from .manager import get_plugin_manager, get_registry
from .messages import log
from .secrets import looks_like_secret, mask_secrets, secret_hint
from .sinks import SinkError
from .types import (
    AdamParams,
    Backend,
    DatasetFormat,
    DataSource,
    ForwardClient,
    Loss,
    LossFn,
    Message,
    Metrics,
    PairLogps,
    PreferencePair,
    PublishingBackend,
    ReferenceProvider,
    SamplingBackend,
    Source,
    TokenizedPair,
    TokenLogps,
)

__all__ = [
    "AdamParams", "Backend", "Config", "ConfigError", "DataError", "DataSource", "DatasetFormat", "DiskError",
    "ForwardClient",
    "Loss", "LossFn", "Message", "Metrics", "PairLogps", "PluginError", "PreferencePair",
    "PreftuneError", "PublishingBackend", "RecordError", "ReferenceProvider", "SamplingBackend", "SinkError",
    "Source",
    "TokenLogps", "TokenizedPair", "TrainingError", "get_plugin_manager", "get_registry", "hookimpl",
    "load_config", "log", "looks_like_secret", "mask_secrets", "run", "secret_hint", "tokenize_pair",
]
