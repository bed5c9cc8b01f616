"""The Fireworks control plane (accounts, trainer jobs, deployments, hot-load) and the trainer
job URLs that carry the session API of :mod:`tinker_routes`."""

from __future__ import annotations

ROUTES: list = []
