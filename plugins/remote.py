"""What the remote backends (``tinker``, ``fireworks``) share: pairs as datums, the run's loss as a
client-side custom loss, bounded calls with retries, and the little state a checkpoint keeps.

Both services run a model on datums (input tokens, a target token and a weight per position) and
return each target's log-prob. A pair becomes two datums, chosen then rejected, in the order the
cookbook sends them (``[c0, r0, c1, r1, ...]``). The loss plugin runs here, on the client, on the
per-sequence numbers those log-probs add up to; the SDK sends back ``-dloss/dlogprob`` as weights
of a cross-entropy backward pass on the service.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlparse, urlsplit, urlunsplit

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from preftune import (
    AdamParams,
    ConfigError,
    LossFn,
    PairLogps,
    TokenizedPair,
    TokenLogps,
    TrainingError,
    log,
    looks_like_secret,
    mask_secrets,
    secret_hint,
)

T = TypeVar("T")
STATE_FILE = "remote.json"
OPERATIONAL = {"operational": True}  # how long to wait, how often to retry: a resume may change it


class RemoteOptions(BaseModel):
    """Settings every remote backend has (each adds its own)."""

    model_config = ConfigDict(extra="forbid")
    base_url: str | None = Field(None, description="The service's URL (default: the SDK's own).")
    api_key_env: str = Field(description="Environment variable that holds the API key.")
    timeout_s: float = Field(600.0, gt=0, description="Longest wait for one call's result.",
                             json_schema_extra=OPERATIONAL)
    connect_timeout_s: float = Field(10.0, gt=0, description="Longest wait to reach the service.",
                                     json_schema_extra=OPERATIONAL)
    retries: int = Field(3, ge=0, description="Retries of a call that is safe to repeat.",
                         json_schema_extra=OPERATIONAL)

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, value: str) -> str:
        default = cls.model_fields["api_key_env"].default
        return check_env_name(value, default if isinstance(default, str) else "MY_API_KEY")

    def api_key(self, prefix_hint: str) -> str:
        try:  # validated already, unless the options were assigned to since
            check_env_name(self.api_key_env, "MY_API_KEY")
        except ValueError as exc:
            raise ConfigError(f"api_key_env {exc}") from None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"set the environment variable {self.api_key_env} to your API key "
                              f"({prefix_hint}); the key is never written to logs or checkpoints")
        return key


def check_env_name(name: str, example: str) -> str:
    """``name`` if it can name an environment variable; else a ``ValueError`` that does not
    repeat it (a key pasted where its variable's name belongs)."""
    if looks_like_secret(name):
        raise ValueError(f"holds what looks like an API key ({secret_hint(name)}): it takes the NAME "
                         f"of the environment variable that holds the key, e.g. {example}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError("must name an environment variable (letters, digits and _), not hold the "
                         f"key itself, e.g. {example}")
    return name


def datums(pairs: Sequence[TokenizedPair], make: Callable[[list[int], list[int], list[float]], Any]
           ) -> list[Any]:
    """Two datums per pair, ``[c0, r0, c1, r1, ...]``: inputs, next-token targets, weights."""
    out = []
    for pair in pairs:
        for side in ("chosen", "rejected"):
            tokens, weights = pair.sequence(side)
            out.append(make(tokens[:-1], tokens[1:], weights))
    return out


def pair_logps(pairs: Sequence[TokenizedPair], logprobs: Sequence[torch.Tensor],
               token_logps: bool) -> PairLogps:
    """Per-sequence numbers (and per-token rows) of ``pairs`` from the datums' log-probs; the
    result stays differentiable in ``logprobs``."""
    sums: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    counts: dict[str, list[float]] = {"chosen": [], "rejected": []}
    rows: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for k, pair in enumerate(pairs):
        for j, side in enumerate(("chosen", "rejected")):
            row = logprobs[2 * k + j].reshape(-1).float()
            _, weights = pair.sequence(side)
            w = torch.tensor(weights, dtype=torch.float32)
            if row.numel() != w.numel():
                raise TrainingError(f"the service returned {row.numel()} log-probs for a sequence "
                                    f"of {w.numel()} targets")
            sums[side].append((row * w).sum())
            counts[side].append(float(w.sum()))
            start = len(pair.prompt) - 1
            rows[side].append(row[start:] * w[start:])
    tokens = None
    if token_logps:  # [B, T] each, right-padded with 0 to the longest completion of either side
        table = torch.nn.utils.rnn.pad_sequence(rows["chosen"] + rows["rejected"], batch_first=True)
        tokens = TokenLogps(table[: len(pairs)], table[len(pairs):])
    return PairLogps(torch.stack(sums["chosen"]), torch.stack(sums["rejected"]),
                     torch.tensor(counts["chosen"]), torch.tensor(counts["rejected"]), tokens)


def custom_loss(pairs: Sequence[TokenizedPair], loss_fn: LossFn) -> tuple[Callable[..., Any], set[str]]:
    """The SDKs' custom-loss callback ``(data, logprobs_list) -> (loss, metrics)`` for the run's
    loss on ``pairs``, and the set its metric names go into (the SDK mixes in its own metrics, such
    as ``loss:sum``, under which the loss would be shadowed)."""
    names: set[str] = set()

    def run(data: Any, logprobs_list: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        try:
            policy = pair_logps(pairs, logprobs_list, loss_fn.needs_token_logps)
            loss, metrics = loss_fn(policy)
            names.update(metrics)
            return loss, {k: float(v) for k, v in metrics.items()}
        except Exception as exc:  # marked, so that it is not taken for the service's error
            raise LossFailed(exc) from exc

    return run, names


class LossFailed(Exception):
    """The run's loss raised inside the SDK's custom-loss callback; carries its exception."""

    def __init__(self, original: Exception):
        super().__init__(str(original))
        self.original = original


class RemoteError(TrainingError):
    """A call to the service failed; ``transient`` when repeating it may succeed."""

    def __init__(self, message: str, transient: bool, status: int | None = None):
        super().__init__(mask_secrets(message))  # it may quote a URL, or an SDK's error quoting one
        self.transient, self.status = transient, status

    @property
    def refused(self) -> bool:
        """The service answered that it will not do this (a 4xx other than timeout, conflict
        and rate limit): nothing was done."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in (408, 409, 429)


class Service:
    """How calls to one remote service are made: every wait bounded, the SDK's errors turned
    into preftune's, and calls that are safe to repeat retried with backoff."""

    def __init__(self, name: str, options: RemoteOptions, errors: tuple[type, ...],
                 transient: tuple[type, ...]):
        self.name, self.options, self.errors, self.transient = name, options, errors, transient
        self.where = ""  # the service's ids for what this run created, named in its errors

    def run(self, what: str, call: Callable[[], T], timeout: float | None = None) -> T:
        """``call()`` (an SDK call, which may block inside) in a daemon thread, waiting at most
        ``timeout`` (default ``timeout_s``) seconds; the SDK's errors become :class:`RemoteError`.
        A call still running when its wait ends cannot keep the process from exiting."""
        timeout = timeout or self.options.timeout_s
        future: Future[T] = Future()

        def work() -> None:
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=work, name=f"preftune-{self.name}", daemon=True).start()
        return self._converted(what, lambda: future.result(timeout=timeout), timeout)

    def wait(self, what: str, future: Any) -> Any:
        """The result of an SDK future, waiting at most ``timeout_s``."""
        timeout = self.options.timeout_s
        return self._converted(what, lambda: future.result(timeout=timeout), timeout)

    def _converted(self, what: str, call: Callable[[], T], timeout: float) -> T:
        try:
            return call()
        except LossFailed as exc:  # the run's own loss, not the service: its error as it is
            raise exc.original from None
        except (TimeoutError, FutureTimeout):
            where = f" ({self.where})" if self.where else ""
            raise RemoteError(f"{self.name}: {what}: no result within {timeout:g} s{where}",
                              transient=True) from None
        except self.errors as exc:
            where = f" ({self.where})" if self.where else ""
            raise RemoteError(f"{self.name}: {what} failed{where}: {describe(exc)}",
                              transient=isinstance(exc, self.transient), status=http_status(exc)) from None

    def call(self, what: str, submit: Callable[[], Any], repeatable: bool = False) -> Any:
        """Submit and wait; a repeatable call is retried with backoff on a transient error.
        Training calls are not repeatable: a gradient applied twice would be silently wrong."""
        attempts = self.options.retries + 1 if repeatable else 1
        for attempt in range(attempts):
            try:
                return self.wait(what, self.run(what, submit))
            except RemoteError as exc:
                if not exc.transient or attempt + 1 == attempts:
                    raise
                pause = min(2.0 ** attempt, 30.0)
                log(f"{exc}; retrying in {pause:g} s")
                time.sleep(pause)
        raise AssertionError("unreachable")

    def pending(self, what: str, submit: Callable[[], Any], convert: Callable[[Any], T],
                repeatable: bool = False) -> Pending[T]:
        return Pending(self, what, submit, convert, repeatable)


class Pending(Generic[T]):
    """A remote result still being computed; the loop calls ``result()`` once per step."""

    def __init__(self, service: Service, what: str, submit: Callable[[], Any],
                 convert: Callable[[Any], T], repeatable: bool):
        self.service, self.what, self.submit, self.convert = service, what, submit, convert
        self.repeatable = repeatable
        self.future = service.run(what, submit)  # some SDK calls block for their first half

    def result(self) -> T:
        try:
            value = self.service.wait(self.what, self.future)
        except RemoteError as exc:
            if not (exc.transient and self.repeatable and self.service.options.retries):
                raise
            log(f"{exc}; retrying")
            value = self.service.call(self.what, self.submit, repeatable=True)
        return self.convert(value)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of the answer an SDK error reports, if it reports one."""
    status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def describe(exc: BaseException) -> str:
    """An SDK error in one line (the rest of httpx's is a link to a page about the status); one
    without a message by its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else f"{type(exc).__name__} (no message)"
    return mask_secrets(text if len(text) < 500 else text[:500] + "...")


def import_sdk(module: str, extra: str) -> Any:
    """The SDK module, or a config error that says which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"this backend needs {module!r}, which is not installed ({exc}): "
                          f"pip install 'preftune[{extra}]'") from None


class ReferenceClient:
    """Forward-only log-probs from one of the service's models: the policy before its first
    step (``policy``), or a frozen model; ``on_close`` releases what was made for it."""

    def __init__(self, backend: TrainingClientBackend, client: Any, policy: bool = False,
                 on_close: Callable[[], None] | None = None):
        self.backend, self.client, self.policy, self.on_close = backend, client, policy, on_close

    def forward(self, pairs: Sequence[TokenizedPair], token_logps: bool = False) -> Any:
        if self.policy and self.backend.stepped:
            raise TrainingError("the policy has been stepped: it is no longer the reference")
        return self.backend.forward_with(self.client, pairs, token_logps)

    def close(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


class TrainingClientBackend:
    """The verbs both SDKs' training clients share (``forward``, ``forward_backward_custom``,
    ``optim_step``); a backend sets ``types`` (the SDK's Datum, ModelInput, AdamParams), ``service``
    and ``client``, and adds how it provisions, saves and cleans up."""

    types: Any
    service: Service
    client: Any
    stepped = False
    saves = 0

    def checkpoint_name(self, kind: str) -> str:
        """A fresh name for something the service saves, as both services accept one (a
        lowercase DNS label)."""
        self.saves += 1
        return f"preftune-{kind}-{secrets.token_hex(3)}-{self.saves}"

    def datum(self, tokens: list[int], targets: list[int], weights: list[float]) -> Any:
        return self.types.Datum(model_input=self.types.ModelInput.from_ints(tokens),
                                loss_fn_inputs={"target_tokens": targets, "weights": weights})

    def forward_with(self, client: Any, pairs: Sequence[TokenizedPair], token_logps: bool) -> Any:
        data = datums(pairs, self.datum)

        def convert(out: Any) -> PairLogps:
            rows = [torch.tensor(o["logprobs"].data, dtype=torch.float32) for o in out.loss_fn_outputs]
            return pair_logps(pairs, rows, token_logps)

        return self.service.pending("forward", lambda: client.forward(data, "cross_entropy"),
                                    convert, repeatable=True)

    def forward(self, pairs: Sequence[TokenizedPair], token_logps: bool = False) -> Any:
        return self.forward_with(self.client, pairs, token_logps)

    def forward_backward(self, pairs: Sequence[TokenizedPair], loss_fn: LossFn) -> Any:
        data = datums(pairs, self.datum)
        loss, names = custom_loss(pairs, loss_fn)
        return self.service.pending(
            "forward_backward", lambda: self.client.forward_backward_custom(data, loss),
            lambda out: {k: v for k, v in out.metrics.items() if k in names})

    def optim_step(self, params: AdamParams) -> Any:
        adam = self.types.AdamParams(
            learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
            eps=params.eps, weight_decay=params.weight_decay, grad_clip_norm=params.max_grad_norm)
        self.stepped = True
        return self.service.pending("optim_step", lambda: self.client.optim_step(adam),
                                    lambda out: dict(out.metrics or {}))


def check_url(url: str | None, key: str) -> None:
    """Refuse a setting ``key`` that is not an http(s) URL (``None``: the SDK's default)."""
    parsed = urlparse(url or "http://default")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{key} = {mask_secrets(repr(url))} is not an http(s) URL")


def check_reachable(url: str, timeout: float, probe: str = "", service: str = "") -> None:
    """Fail in seconds, not minutes, when nothing answers at ``url`` (the SDKs retry a refused
    connection for minutes). Any HTTP answer, even an error, counts as reachable, except that
    ``url + probe`` (an endpoint every ``service`` has) answered "no such page" or with a web
    page: an ordinary web server, where an SDK would retry until its timeout. A user name and
    password in ``url`` are not sent (they are the SDK's to use), nor ever shown."""
    target, url = without_userinfo(url).rstrip("/") + probe, mask_secrets(url)
    try:
        with urllib.request.urlopen(urllib.request.Request(target, method="GET"), timeout=timeout) as answer:
            status, kind = answer.status, answer.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, kind = exc.code, exc.headers.get_content_type() if exc.headers else ""
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrainingError(mask_secrets(f"cannot reach the service at {url}: {reason} "
                                         f"(waited at most {timeout:g} s)")) from None
    if probe and (status in (404, 405, 501) or kind == "text/html"):
        raise TrainingError(f"the server at {url} is not a {service} service: GET {probe} answered "
                            f"{status} ({kind or 'no content type'}); check its base_url")


def without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


def write_state(path: str, state: dict[str, Any]) -> None:
    """A checkpoint of a remote backend: the names of what the service saved, nothing secret."""
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_state(path: str) -> dict[str, Any]:
    file = Path(path) / STATE_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {path} holds no remote state ({file.name}): {exc}") from None
