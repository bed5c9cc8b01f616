"""Reference providers: ``separate`` (a frozen copy of the base model), ``lora_shared`` (the
policy's own base with the LoRA adapter disabled: no second model in memory) and ``none``.

Both ask the backend for a forward-only client, and only when the reference cache misses: a run
whose cache is fresh never loads a reference model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from preftune import Backend, Config, ConfigError, ForwardClient, PairLogps, TokenizedPair, hookimpl


class BackendReference:
    """Reference log-probs from a client the backend creates on first use."""

    def __init__(self, backend: Backend, shared: bool):
        self.backend = backend
        self.shared = shared
        self._client: ForwardClient | None = None

    def identity(self) -> dict[str, str]:
        # the base with the adapter off is the base model: both kinds share one cache entry
        return self.backend.identity()

    def forward(self, pairs: Sequence[TokenizedPair], token_logps: bool = False) -> PairLogps:
        if self._client is None:
            self._client = self.backend.reference_client(shared=self.shared)
        return self._client.forward(pairs, token_logps)

    def close(self) -> None:
        """Free the client (a separate model) once the reference pass is done."""
        client, self._client = self._client, None
        close = getattr(client, "close", None)
        if callable(close):
            close()


def _separate(config: Config, options: Any, backend: Backend) -> BackendReference:
    return BackendReference(backend, shared=False)


def _lora_shared(config: Config, options: Any, backend: Backend) -> BackendReference:
    if config.lora_rank <= 0:
        raise ConfigError("reference 'lora_shared' needs lora_rank > 0 (a LoRA adapter to disable)")
    return BackendReference(backend, shared=True)


def _none(config: Config, options: Any, backend: Backend) -> None:
    return None


@hookimpl
def register_reference_providers(register: Any) -> None:
    register("separate", _separate)
    register("lora_shared", _lora_shared)
    register("none", _none)
