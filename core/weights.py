"""Loading causal LMs by name, and identifying and hashing their weights.

A name is a Hugging Face model id, a local directory, or ``builtin:tiny`` (the embedded model).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from . import tiny
from .errors import ConfigError


def load_causal_lm(name: str, revision: str | None = None, dtype: Any = None,
                   attn_implementation: str | None = None) -> Any:
    """The causal LM called ``name`` (weights on the CPU; the caller moves it), with transformers'
    ``attn_implementation`` (None: transformers' default, sdpa where the model has it)."""
    if tiny.is_builtin(name):
        check_builtin(name)
        model = tiny.tiny_model()
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model.to(dtype) if dtype is not None else model
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype,
                                                    attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {name!r}: {exc}") from None


def load_model_config(name: str, revision: str | None = None) -> Any:
    """The transformers config of the causal LM ``name``, no weights read: its structure and
    context length, for checks made before anything loads. A name that can only be a path (not
    a Hugging Face model id) must be an existing directory."""
    if tiny.is_builtin(name):
        check_builtin(name)
        return tiny.tiny_config()
    check_local_name(name)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load model {name!r}: not a local model directory, and from the "
                          f"Hugging Face Hub: {reason}") from None


def check_local_name(name: str, what: str = "model") -> None:
    """Refuse a model (or tokenizer) name that is neither an existing directory nor a possible
    hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name)
    if path.is_dir():
        return
    if path.exists():
        raise ConfigError(f"{what} {name!r} is a file; a local {what} is a directory")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{what} {name!r}: no such directory ({path.absolute()})") from None


def check_builtin(name: str) -> None:
    """Refuse a ``builtin:`` name that is not a model preftune ships."""
    if name != tiny.TINY:
        raise ConfigError(f"unknown builtin model {name!r}; the builtin models are: {tiny.TINY}")


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


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")
CONFIG_FILES = ("config.json", "adapter_config.json", "*.safetensors.index.json")
HEADER_LIMIT = 100 << 20  # bytes: safetensors refuses longer headers too


def model_files(directory: Path) -> list[Path]:
    """The weight and config files of a model (or adapter) directory, sorted by name."""
    patterns = WEIGHT_FILES + CONFIG_FILES
    return sorted({f for pattern in patterns for f in Path(directory).glob(pattern) if f.is_file()})


def files_hash(directory: Path) -> str:
    """sha256 over the names and bytes of the weight and config files of a model directory: an
    integrity hash of what is there (it reads every byte; :func:`files_identity` does not)."""
    digest = hashlib.sha256()
    for file in model_files(directory):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def files_identity(directory: Path) -> str:
    """sha256 that says which weights a model (or adapter) directory holds, without reading
    them: the config files' content, and each weight file's name, size, modification time (ns)
    and, for safetensors, its JSON header (tensor names, dtypes, shapes, offsets). Rewriting a
    weight file gives it a new modification time, so the identity changes; a copy that keeps
    the times, sizes and headers of other values (``cp -p`` of a same-shaped model) does not.
    Costs a few kilobytes of reads where :func:`files_hash` reads every weight."""
    digest = hashlib.sha256()
    for file in model_files(directory):
        digest.update(file.name.encode() + b"\0")
        if file.suffix == ".json":
            digest.update(file.read_bytes())
            continue
        stat = file.stat()
        digest.update(f"{stat.st_size} {stat.st_mtime_ns}\0".encode())
        if file.suffix == ".safetensors":
            digest.update(safetensors_header(file))
    return digest.hexdigest()


def safetensors_header(file: Path) -> bytes:
    """The length prefix and JSON header at the start of a safetensors file (what it holds and
    where); a file too short for its prefix gives what there is."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        return prefix + handle.read(min(length, HEADER_LIMIT))


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context(structure: Any) -> tuple[str, int] | None:
    """The longest sequence a model config says it takes: ``(key, length)``, or None."""
    text = structure.get_text_config() if hasattr(structure, "get_text_config") else structure
    key = next((k for k in CONTEXT_KEYS if isinstance(getattr(text, k, None), int)), None)
    return (key, int(getattr(text, key))) if key is not None else None
