"""The data path: sources of records, formats, checks, tokenization, the held-out split, caches.

For authors of source plugins: :func:`read_records` (JSONL with every byte-level check),
:func:`check_readable` and :func:`file_sha256`.
"""

from .jsonl import check_readable, read_records
from .records import AutoFormat, ParseResult, check_pair, load_pairs, make_format, parse_file
from .split import (
    check_held_out,
    content,
    epoch_order,
    keep_repeats_in_train,
    length_batches,
    no_training_pairs,
    split_eval,
)
from .tokcache import file_sha256
from .tokenize import TokenizeReport, assemble, control_tokens, render, tokenize_pair, tokenize_pairs

__all__ = [
    "AutoFormat", "ParseResult", "TokenizeReport", "assemble", "check_held_out", "check_pair",
    "check_readable", "content", "control_tokens", "epoch_order", "file_sha256", "keep_repeats_in_train",
    "length_batches", "load_pairs", "make_format", "no_training_pairs", "parse_file", "read_records",
    "render", "split_eval", "tokenize_pair", "tokenize_pairs",
]
