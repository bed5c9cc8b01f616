"""The embedded tiny model, its tokenizer and the bundled demo preference data.

Everything here works offline: the tokenizer and the JSONL files ship as package data
under ``assets/tiny/`` (regenerate them with ``tools/build_tiny_assets.py``), and the
model is a small randomly initialised Qwen3 built from a fixed seed. Nothing is built
at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "ASSETS",
    "SPLITS",
    "TINY",
    "demo_data",
    "is_builtin",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
]

TINY = "builtin:tiny"
"""Model/tokenizer name that selects the embedded tiny model."""

ASSETS: Path = Path(__file__).resolve().parent / "assets" / "tiny"
"""Directory holding the tiny tokenizer files and the demo JSONL data."""

SPLITS: dict[str, str] = {"train": "train.jsonl", "heldout": "heldout.jsonl"}
"""Bundled demo splits and their file names inside :data:`ASSETS`."""


def is_builtin(name: str | None) -> bool:
    """Return True if ``name`` refers to an embedded asset (starts with ``"builtin:"``)."""
    return isinstance(name, str) and name.startswith("builtin:")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Load the bundled byte-level BPE tokenizer (ChatML chat template) from :data:`ASSETS`.

    eos is ``<|im_end|>``, pad is ``<|endoftext|>``; no bos token is prepended.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(ASSETS), local_files_only=True)


def tiny_config() -> Qwen3Config:
    """Config of the tiny Qwen3: 2 layers, hidden 64, 4 heads (2 kv), tied embeddings."""
    from transformers import Qwen3Config

    tok = tiny_tokenizer()
    pad_id = tok.pad_token_id
    return Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        use_sliding_window=False,
        pad_token_id=pad_id,
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else pad_id,
        eos_token_id=tok.eos_token_id,
    )


def tiny_model(seed: int = 0) -> Qwen3ForCausalLM:
    """Build the tiny Qwen3 in float32 with weights fixed by ``seed``.

    Two calls with the same seed give identical weights; the global torch RNG state is
    left untouched.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    config = tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.to(torch.float32)


def demo_data(split: str) -> Path:
    """Path of a bundled demo JSONL split (``"train"`` or ``"heldout"``).

    ``train`` uses the chosen/rejected message format, ``heldout`` the
    input/preferred_output/non_preferred_output format.
    """
    try:
        return ASSETS / SPLITS[split]
    except KeyError:
        known = ", ".join(repr(s) for s in SPLITS)
        raise ValueError(f"unknown demo split {split!r}; known splits: {known}") from None
