"""Tokenizers by name, and saying exactly which model and tokenizer a name resolved to.

The identity of a model (its revision, or a hash of its weights) and of a tokenizer (hashes of its
vocabulary and chat template) key the reference and tokenization caches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from . import tiny
from .errors import ConfigError
from .weights import check_builtin, files_identity, state_dict_hash


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """The tokenizer called ``name``; it must have a chat template."""
    if tiny.is_builtin(name):
        check_builtin(name)
        return tiny.tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer {name!r}: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer {name!r} has no chat template; preftune needs one")
    return tokenizer


def model_identity(name: str, revision: str | None = None, model: Any = None) -> dict[str, str]:
    """What ``name`` is: the builtin model a hash of its weights, a local directory the identity
    of its files (:func:`files_identity`: config, names, sizes, times and safetensors headers,
    never the weights' bytes), a hub id its revision."""
    if tiny.is_builtin(name):
        return {"model": name, "weights_sha256": state_dict_hash(model or tiny.tiny_model())}
    path = Path(name)
    if path.is_dir():
        return {"model": str(path.resolve()), "files_sha256": files_identity(path)}
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {"model": name, "revision": commit or revision or "main"}


def tokenizer_identity(tokenizer: Any) -> dict[str, str]:
    """Hashes of the tokenizer's vocabulary/merges and of its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
    }
