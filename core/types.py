"""Backend-neutral data types and the small Protocols the loop calls.

A :class:`PreferencePair` is what a dataset format produces; a :class:`TokenizedPair` is the same
pair as token ids with loss weights. A backend lays a micro-batch of tokenized pairs out as it
likes and returns :class:`PairLogps`: per-sequence sums of completion log-probs and token counts,
which is all a (sequence-level) loss sees. Token layout follows the training SDKs' ``Datum``: a
sequence ``s`` becomes model input ``s[:-1]`` and targets ``s[1:]``, and weights are aligned with
the targets (1 on completion tokens only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

T = TypeVar("T", covariant=True)


@dataclass(frozen=True)
class Message:
    """One chat message. ``name``, ``tool_calls`` and ``tool_call_id`` are passed to the chat
    template when set; ``tool_calls`` is held as canonical JSON text (a list of calls), so that a
    message stays hashable and two equal calls compare equal."""

    role: str
    content: str
    name: str | None = None
    tool_calls: str | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat template takes it (unset keys left out)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = json.loads(self.tool_calls)
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Source:
    """Where a record came from, as a user finds it: ``file:line`` for line files (1-based
    lines), ``file#row`` for columnar ones and ``hf:org/name@split#row`` for the hub (0-based
    rows, as ``dataset[row]`` counts them). ``file`` is the data set as the run names it."""

    file: str
    line: int
    sep: str = ":"

    def __str__(self) -> str:
        return f"{self.file}{self.sep}{self.line}"


Conversation = tuple[Message, ...]


@dataclass(frozen=True)
class PreferencePair:
    """A normalized preference pair: a shared prompt and two alternative completions.

    Chat pairs hold messages, rendered with the tokenizer's chat template; text pairs (TRL's
    "standard" records) hold one string each, tokenized as text without a template, the end-of-
    sequence token appended to each completion. ``tools`` is a record-level tool list as
    canonical JSON text, passed to the chat template.
    """

    prompt: Conversation | str
    chosen: Conversation | str
    rejected: Conversation | str
    source: Source | None = None
    tools: str | None = None

    @property
    def is_text(self) -> bool:
        return isinstance(self.prompt, str)


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


@dataclass(frozen=True)
class TokenLogps:
    """Per-token completion log-probs of B pairs, for losses that set ``needs_token_logps``.

    Each is ``[B, T]``, right-padded with 0: row ``i`` holds the weighted log-prob of each target
    token of pair ``i``'s completion, in order (prompt tokens are not included).
    """

    chosen_BT: Tensor
    rejected_BT: Tensor


@dataclass(frozen=True)
class PairLogps:
    """What a loss sees of B pairs: per-sequence numbers, independent of any batch layout.

    ``chosen`` and ``rejected`` are ``[B]`` sums of the completion tokens' log-probs (each times
    its weight); ``chosen_tokens`` and ``rejected_tokens`` are ``[B]`` completion token counts
    (sums of the weights). ``tokens`` carries per-token values, only for a loss that asks for them.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    tokens: TokenLogps | None = None
    token_total: float | None = None  # set by the loop under several processes: see chosen_token_mean

    @property
    def size(self) -> int:
        return int(self.chosen.shape[0])

    def chosen_token_mean(self) -> Tensor:
        """The mean log-prob over every chosen completion token of the batch, one number (TRL's
        per-token averages: long completions weigh more). Under several processes a rank holds a
        share of each micro-batch, and the loop sets ``token_total`` to that share's part of the
        micro-batch's chosen tokens (their count times the share's pairs over the micro-batch's),
        so that the shares, weighted by their pairs as every loss is, give one process's mean."""
        if self.token_total is not None:
            return self.chosen.sum() / max(self.token_total, 1.0)
        return self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)

    def means(self) -> tuple[Tensor, Tensor]:
        """Length-normalized (per-token mean) log-probs of chosen and rejected: two ``[B]``."""
        return (self.chosen / self.chosen_tokens.clamp(min=1),
                self.rejected / self.rejected_tokens.clamp(min=1))

    def to(self, device: torch.device | str) -> PairLogps:
        tokens = None if self.tokens is None else TokenLogps(
            self.tokens.chosen_BT.to(device), self.tokens.rejected_BT.to(device))
        return PairLogps(self.chosen.to(device), self.rejected.to(device),
                         self.chosen_tokens.to(device), self.rejected_tokens.to(device), tokens,
                         self.token_total)

    def detach(self) -> PairLogps:
        tokens = None if self.tokens is None else TokenLogps(
            self.tokens.chosen_BT.detach(), self.tokens.rejected_BT.detach())
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens,
                         self.rejected_tokens, tokens, self.token_total)


@dataclass(frozen=True)
class AdamParams:
    """One optimizer step's settings, as the training SDKs take them."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 = no clipping; the norm is measured either way


Metrics = dict[str, Any]  # metric name -> float or 0-dim tensor (the loop resolves them once a step)


class Future(Protocol[T]):
    """A result that is still being computed (a remote call); the loop calls ``result()``."""

    def result(self) -> T: ...


def resolve(value: T | Future[T]) -> T:
    """The value itself, or the result of a future."""
    result = getattr(value, "result", None)
    return result() if callable(result) else value  # type: ignore[return-value]


@runtime_checkable
class LossFn(Protocol):
    """A loss bound to one micro-batch's reference numbers and its share of the step.

    The loop hands one to :meth:`Backend.forward_backward`; the backend calls it with the policy's
    numbers and backpropagates the returned loss. ``needs_token_logps`` tells the backend to also
    fill ``PairLogps.tokens``.
    """

    needs_token_logps: bool

    def __call__(self, policy: PairLogps) -> tuple[Tensor, Metrics]: ...


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


Read = tuple[Source, Any, Any]  # (where, record, error): exactly one of record and error is set


@runtime_checkable
class DataSource(Protocol):
    """Reads the records of the data sets it claims (files, directories, hub ids, a database).

    ``spec`` is what the config names (``dataset``, ``eval_dataset``) with a ``name:`` prefix of
    this source removed. ``records`` yields ``(where, record, error)`` for every record in order:
    ``where`` a :class:`Source` a user can find, and exactly one of ``record`` (a dict) and
    ``error`` (a :class:`preftune.RecordError`) set.
    """

    def claims(self, spec: str) -> bool:
        """True when this source reads ``spec`` (a path) without being named by a prefix."""
        ...

    def check(self, spec: str, key: str) -> None:
        """Refuse, before anything loads, a ``spec`` this source cannot read: a
        :class:`preftune.ConfigError` naming the config ``key`` and what to do."""
        ...

    def identity(self, spec: str) -> dict[str, str]:
        """What the data is, for the tokenized-data cache key: content hashes of its files, or
        a fingerprint and revision. Any change to the records must change it."""
        ...

    def records(self, spec: str) -> Iterator[Read]:
        """Every record of ``spec``, with its location."""
        ...


@runtime_checkable
class Loss(Protocol):
    """A preference loss: a pure function of per-sequence log-probs of B pairs.

    ``needs_reference``: False for reference-free losses (ORPO); the run then loads no reference.
    An optional ``needs_token_logps = True`` asks for per-token values in ``PairLogps.tokens``
    (policy and reference); without it a loss sees sums and token counts only. A loss made of
    other losses names them in an optional ``parts`` (their options tables are then in use).
    """

    needs_reference: bool

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> tuple[Tensor, Metrics]:
        """Return the scalar loss (mean over the B pairs) and metrics (means over the pairs)."""
        ...


@runtime_checkable
class ForwardClient(Protocol):
    """Anything that computes per-sequence log-probs of pairs without gradients."""

    def forward(self, pairs: Sequence[TokenizedPair],
                token_logps: bool = False) -> PairLogps | Future[PairLogps]:
        """The pairs' completion log-prob sums and counts (and per-token values when asked)."""
        ...


@runtime_checkable
class ReferenceProvider(ForwardClient, Protocol):
    """Where the reference log-probs of a loss that needs them come from.

    Opened for the reference pass and closed by the loop as soon as the cache is complete: a
    frozen local model is freed, a remote forward-only job deleted.
    """

    def identity(self) -> dict[str, str]:
        """What the reference model is, for the reference cache key (model, revision, hash)."""
        ...

    def close(self) -> None:
        """Release what the reference pass loaded or created."""
        ...


@runtime_checkable
class Backend(ForwardClient, Protocol):
    """Where the policy lives and forward/backward/optimizer steps run (local or remote).

    The backend owns the layout: it receives a micro-batch's tokenized pairs and decides how to
    lay them out (padded, packed, the prompt shared by chosen and rejected, remote datums).
    Verbs may return futures; the loop resolves a step's results once.

    Optional members the loop looks for (docs/backends.md): ``default_reference()``,
    ``guards_nonfinite`` (``optim_step`` never applies a non-finite gradient, so the loop steps
    before its one host sync), ``summary()`` (added to the run's summary), ``peak_mem_mb()``;
    on the factory: ``check(config, options)``, ``outputs(config, options)`` and ``export``.
    """

    def identity(self) -> dict[str, str]:
        """What the base model is: name plus revision or a weights hash."""
        ...

    def reference_client(self, shared: bool) -> ForwardClient:
        """A frozen reference: the base with the adapter off (``shared``), or a separate copy."""
        ...

    def forward_backward(self, pairs: Sequence[TokenizedPair],
                         loss_fn: LossFn) -> Metrics | Future[Metrics]:
        """Run the policy forward on ``pairs``, apply ``loss_fn(policy)``, accumulate the
        gradient of its loss; return its metrics (tensors or floats)."""
        ...

    def optim_step(self, params: AdamParams) -> Metrics | Future[Metrics]:
        """Apply the accumulated gradient, clear it; return at least ``grad_norm``."""
        ...

    def save_weights(self, path: str) -> dict[str, Any] | None:
        """Write the policy in Hugging Face format (a PEFT adapter dir for LoRA) to ``path``.
        A remote backend saves them on its service, writes their name to ``path`` and returns
        it (for example ``{"remote_weights": ...}``) for the run's summary."""
        ...

    def save_state(self, path: str) -> None:
        """Write weights and optimizer state to ``path`` so :meth:`load_state` can resume."""
        ...

    def load_state(self, path: str) -> None:
        """Restore what :meth:`save_state` wrote."""
        ...

    def close(self, status: str = "completed") -> None:
        """Release models, sessions and remote jobs; ``status`` is the run's outcome
        (``completed``, ``stopped`` or ``failed``), which a remote service may record."""
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


@runtime_checkable
class SamplingBackend(Backend, Protocol):
    """A backend that can say what the policy now generates (``eval_samples``).

    Local: transformers' ``generate``. Tinker: a sampler save and its sampling client. A backend
    without ``sample`` trains on; the run says once that it shows no samples.
    """

    def sample(self, prompts: Sequence[Sequence[int]], max_tokens: int,
               stop: Sequence[int]) -> list[list[int]]:
        """Greedy (temperature 0) completions of the current policy weights for each prompt
        (token ids, the prompt not repeated), at most ``max_tokens`` new tokens each, ending at
        the first token in ``stop`` (that token included) or at ``max_tokens``. Under several
        processes every rank calls it with the same prompts; the main rank's answer is used."""
        ...
