"""Progress messages: one line each, to stderr, so stdout stays for results."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """Print ``[preftune] message`` to stderr."""
    print(f"[preftune] {message}", file=sys.stderr, flush=True)
