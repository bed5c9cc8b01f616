"""Loading tokenizers and causal LMs by name, and saying exactly which model a name resolved to.

A name is a Hugging Face model id, a local directory, or ``builtin:tiny`` (the embedded model).
The identity of a model (its revision, or a hash of its weights) keys the reference cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from . import tiny
from .errors import ConfigError


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """The tokenizer called ``name``; it must have a chat template."""
    if tiny.is_builtin(name):
        _check_builtin(name)
        return tiny.tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer {name!r}: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer {name!r} has no chat template; preftune needs one")
    return tokenizer


def load_causal_lm(name: str, revision: str | None = None, dtype: Any = None) -> Any:
    """The causal LM called ``name`` (weights on the CPU; the caller moves it)."""
    if tiny.is_builtin(name):
        _check_builtin(name)
        model = tiny.tiny_model()
        return model.to(dtype) if dtype is not None else model
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {name!r}: {exc}") from None


def _check_builtin(name: str) -> None:
    if name != tiny.TINY:
        raise ConfigError(f"unknown builtin model {name!r}; the builtin models are: {tiny.TINY}")


def model_identity(name: str, revision: str | None = None, model: Any = None) -> dict[str, str]:
    """What ``name`` is: a local path or builtin gets a weights hash, a hub id its revision."""
    if tiny.is_builtin(name):
        return {"model": name, "weights_sha256": state_dict_hash(model or tiny.tiny_model())}
    path = Path(name)
    if path.is_dir():
        return {"model": str(path.resolve()), "weights_sha256": files_hash(path)}
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {"model": name, "revision": commit or revision or "main"}


def resolve_init(path: str) -> tuple[str, Path]:
    """What ``init_from`` points at: ``("model", dir)`` for a Hugging Face model directory,
    ``("adapter", dir)`` for a PEFT adapter; a preftune checkpoint holds one of them."""
    directory = Path(path)
    if (directory / "trainer_state.json").exists():
        directory = directory / "backend"
    if (directory / "adapter_config.json").exists():
        return "adapter", directory
    if (directory / "config.json").exists():
        return "model", directory
    raise ConfigError(
        f"init_from {path!r} is not a preftune checkpoint, a Hugging Face model directory "
        "(config.json) or a PEFT adapter directory (adapter_config.json)"
    )


def state_dict_hash(model: Any) -> str:
    """sha256 over the names and bytes of a model's parameters and buffers."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_u8()).numpy())
    return digest.hexdigest()


def _u8() -> Any:
    import torch

    return torch.uint8


def files_hash(directory: Path) -> str:
    """sha256 over the weight and config files of a model directory."""
    digest = hashlib.sha256()
    patterns = ("*.safetensors", "*.bin", "*.pt", "config.json", "adapter_config.json")
    files = sorted({f for pattern in patterns for f in directory.glob(pattern)})
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> dict[str, str]:
    """Hashes of the tokenizer's vocabulary/merges and of its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "tokenizer_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
    }
