"""Backend-neutral data types and the small Protocols the loop calls.

A :class:`PreferencePair` is what a dataset format produces; a :class:`TokenizedPair` is the same
pair as token ids with loss weights; a :class:`Batch` stacks pairs into padded tensors. Token
layout follows the training SDKs' ``Datum``: a sequence ``s`` becomes model input ``s[:-1]`` and
targets ``s[1:]``, and weights are aligned with the targets (1 on completion tokens only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True)
class Source:
    """Where a record came from: file path and 1-based line number."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class PreferencePair:
    """A normalized preference pair: a shared prompt and two alternative completions."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    source: Source | None = None


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as token ids: the prompt's tokens and each completion's tokens with loss weights."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    chosen_weights: tuple[float, ...]
    rejected_weights: tuple[float, ...]
    source: Source | None = None
    truncated: bool = False

    def sequence(self, which: str) -> tuple[list[int], list[float]]:
        """Full tokens of ``"chosen"`` or ``"rejected"`` and the weights of its targets."""
        completion, weights = getattr(self, which), getattr(self, f"{which}_weights")
        tokens = list(self.prompt) + list(completion)
        return tokens, [0.0] * (len(self.prompt) - 1) + list(weights)

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class Batch:
    """Pairs stacked as right-padded tensors: rows ``[0, B)`` chosen, ``[B, 2B)`` rejected."""

    pairs: list[TokenizedPair]
    index: list[int]  # position of each pair in the run's dataset (reference cache rows)
    input_ids: Tensor  # [2B, T] int64
    targets: Tensor  # [2B, T] int64, the next token of each input position
    weights: Tensor  # [2B, T] float32, loss weight of each target
    attention_mask: Tensor  # [2B, T] int64
    lengths: list[int] = field(default_factory=list)  # targets per row

    @property
    def size(self) -> int:
        return len(self.pairs)

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.pairs)

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Split a ``[2B, ...]`` tensor into its chosen and rejected halves."""
        return rows[: self.size], rows[self.size :]

    def to(self, device: torch.device | str) -> Batch:
        move = {k: getattr(self, k).to(device) for k in ("input_ids", "targets", "weights")}
        return Batch(
            self.pairs,
            self.index,
            attention_mask=self.attention_mask.to(device),
            lengths=self.lengths,
            **move,
        )


def collate(pairs: list[TokenizedPair], index: list[int], pad_id: int = 0) -> Batch:
    """Stack pairs into a :class:`Batch` (chosen sequences first, then rejected)."""
    rows = [p.sequence("chosen") for p in pairs] + [p.sequence("rejected") for p in pairs]
    width = max(len(tokens) - 1 for tokens, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), pad_id, dtype=torch.long)
    weights = torch.zeros((len(rows), width), dtype=torch.float32)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lengths = []
    for i, (tokens, w) in enumerate(rows):
        n = len(tokens) - 1
        input_ids[i, :n] = torch.tensor(tokens[:-1])
        targets[i, :n] = torch.tensor(tokens[1:])
        weights[i, :n] = torch.tensor(w)
        mask[i, :n] = 1
        lengths.append(n)
    return Batch(list(pairs), list(index), input_ids, targets, weights, mask, lengths)


@dataclass
class PairLogps:
    """Per-token log-probs of the targets of a batch: each ``[B, T]``, aligned with weights."""

    chosen: Tensor
    rejected: Tensor

    @classmethod
    def from_rows(cls, logps_2BT: Tensor) -> PairLogps:
        half = logps_2BT.shape[0] // 2
        return cls(logps_2BT[:half], logps_2BT[half:])


@dataclass(frozen=True)
class AdamParams:
    """One optimizer step's settings, as the training SDKs take them."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 = no clipping; the norm is measured either way


Metrics = dict[str, Any]  # metric name -> float or 0-dim tensor (the loop calls float())
LossFn = Callable[[PairLogps, Batch], tuple[Tensor, Metrics]]  # a loss bound to its reference


@runtime_checkable
class DatasetFormat(Protocol):
    """Parses one JSON record of a dataset file into a :class:`PreferencePair`.

    An optional ``field_names`` attribute maps ``prompt``/``chosen``/``rejected`` to the record's
    own field names, so the core's checks (empty or identical responses) name the right field.
    """

    def matches(self, record: dict[str, Any]) -> bool:
        """True when ``record`` has this format's keys (used by ``format = "auto"``)."""
        ...

    def parse(self, record: dict[str, Any]) -> PreferencePair:
        """Return the pair; raise :class:`preftune.RecordError` naming the bad field."""
        ...


@runtime_checkable
class Loss(Protocol):
    """A preference loss: a pure function of log-probs, computed for a whole batch at once."""

    needs_reference: bool

    def __call__(
        self, policy: PairLogps, reference: PairLogps | None, batch: Batch
    ) -> tuple[Tensor, Metrics]:
        """Return the scalar batch loss (mean over pairs) and metrics (batch means)."""
        ...


@runtime_checkable
class ForwardClient(Protocol):
    """Anything that computes log-probs of a batch without gradients."""

    def forward(self, batch: Batch) -> PairLogps:
        """Per-token log-probs of the batch's targets, as float32 on the CPU or device."""
        ...


@runtime_checkable
class ReferenceProvider(ForwardClient, Protocol):
    """Where the reference log-probs of a loss that needs them come from."""

    def identity(self) -> dict[str, str]:
        """What the reference model is, for the reference cache key (model, revision, hash)."""
        ...


@runtime_checkable
class Backend(ForwardClient, Protocol):
    """Where the policy lives and forward/backward/optimizer steps run (local or remote)."""

    def identity(self) -> dict[str, str]:
        """What the base model is: name plus revision or a weights hash."""
        ...

    def reference_client(self, shared: bool) -> ForwardClient:
        """A frozen reference: the base with the adapter off (``shared``), or a separate copy."""
        ...

    def forward_backward(self, batch: Batch, loss_fn: LossFn) -> Metrics:
        """Run the policy forward, apply ``loss_fn(policy_logps, batch)``, accumulate the
        gradient of its loss; return its metrics (tensors or floats)."""
        ...

    def optim_step(self, params: AdamParams) -> Metrics:
        """Apply the accumulated gradient, clear it; return at least ``grad_norm``."""
        ...

    def save_weights(self, path: str) -> None:
        """Write the policy in Hugging Face format (a PEFT adapter dir for LoRA) to ``path``."""
        ...

    def save_state(self, path: str) -> None:
        """Write weights and optimizer state to ``path`` so :meth:`load_state` can resume."""
        ...

    def load_state(self, path: str) -> None:
        """Restore what :meth:`save_state` wrote."""
        ...

    def close(self) -> None:
        """Release models, sessions and remote jobs."""
        ...


@runtime_checkable
class PublishingBackend(Backend, Protocol):
    """A backend that can push the policy's weights to a deployment (the ``weight_sync`` sink).

    Local: a versioned snapshot in ``directory`` and an atomic ``current`` pointer. Remote: the
    service's save-for-sampler and hot-load of ``deployment_id``.
    """

    def publish_weights(self, snapshot: str, step: int, deployment_id: str,
                        directory: str | None, keep: int) -> dict[str, Any]:
        """Publish the current weights as ``snapshot``; return its manifest."""
        ...
