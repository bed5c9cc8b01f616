"""Testing and dry-run tools: a loopback emulator of the remote training services.

Not part of the training kernel; see :mod:`preftune.testing.emulator`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Emulator", "Faults", "Server"]


def __getattr__(name: str) -> Any:
    # imported on use, so that ``python -m preftune.testing.emulator`` runs a fresh module
    if name in __all__:
        from . import emulator

        return getattr(emulator, name)
    raise AttributeError(name)
