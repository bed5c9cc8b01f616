"""Testing and dry-run tools: a loopback emulator of the remote training services.

Not part of the training kernel; see :mod:`preftune.testing.emulator`.
"""

from .emulator import Emulator, Faults, Server

__all__ = ["Emulator", "Faults", "Server"]
