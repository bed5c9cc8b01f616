"""Progress messages: one line each, to stderr, so stdout stays for results."""

from __future__ import annotations

import sys

from .secrets import mask_secrets


def log(message: str) -> None:
    """Print ``[preftune] message`` to stderr, any secret in it masked."""
    print(f"[preftune] {mask_secrets(message)}", file=sys.stderr, flush=True)
