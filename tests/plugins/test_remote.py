"""What the remote backends share: pairs as datums and back, errors, missing SDKs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import ConfigError, Message, PreferencePair, tokenize_pair
from preftune.plugins import remote
from preftune.plugins.local_engine import Engine, auto_chunk, calibrate
from preftune.tiny import tiny_model


def pairs(tokenizer: Any) -> list[Any]:
    out = []
    for i in range(3):
        pair = PreferencePair((Message("user", f"Question {i}: " + "why? " * i),),
                              (Message("assistant", "Because " * (i + 1)),),
                              (Message("assistant", "No."),))
        out.append(tokenize_pair(tokenizer, pair, 128))
    return out


def test_datums_round_trip_to_the_local_backends_numbers(tokenizer: Any) -> None:
    """Per-datum log-probs, as a service returns them, give the local engine's sums, counts and
    per-token rows, and the gradient reaches every datum's log-probs."""
    model = tiny_model().eval()
    batch = pairs(tokenizer)
    datums = remote.datums(batch, lambda tokens, targets, weights: (tokens, targets, weights))
    assert len(datums) == 6
    rows = []
    for tokens, targets, weights in datums:
        assert len(tokens) == len(targets) == len(weights) and sum(weights) > 0
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0]
        row = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[:, None])[:, 0]
        rows.append(row.requires_grad_(True))
    got = remote.pair_logps(batch, rows, token_logps=True)
    plan = calibrate(model, torch.device("cpu"), "auto", auto_chunk(model, 0), 128)
    with torch.no_grad():
        want = Engine(model, torch.device("cpu"), 0, plan)(batch, token_logps=True)
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.tokens.chosen_BT, want.tokens.chosen_BT, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.tokens.rejected_BT, want.tokens.rejected_BT, atol=1e-5, rtol=1e-5)
    (got.chosen.sum() - got.rejected.sum()).backward()
    assert all(row.grad is not None and row.grad.abs().sum() > 0 for row in rows)


def test_a_service_answer_of_the_wrong_length_is_an_error(tokenizer: Any) -> None:
    batch = pairs(tokenizer)[:1]
    with pytest.raises(remote.TrainingError, match="returned 3 log-probs for a sequence of"):
        remote.pair_logps(batch, [torch.zeros(3), torch.zeros(3)], token_logps=False)


@pytest.mark.parametrize(("module", "extra"), [("tinker", "tinker"), ("fireworks.training.sdk", "fireworks")])
def test_a_missing_sdk_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch, module: str,
                                                   extra: str) -> None:
    import importlib

    real = importlib.import_module

    def missing(name: str, *args: Any) -> Any:
        if name.startswith(module.split(".")[0]):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ConfigError, match=rf"pip install 'preftune\[{extra}\]'"):
        remote.import_sdk(module, extra)


def test_only_repeatable_calls_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward may be sent again; a training step never (its gradient would count twice)."""
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)

    class Flaky(Exception):
        pass

    class Done:
        def result(self, timeout: float) -> str:
            return "ok"

    calls = []

    def submit() -> Any:
        calls.append(1)
        if len(calls) < 3:
            raise Flaky("connection reset")
        return Done()

    service = remote.Service("svc", remote.RemoteOptions(api_key_env="K", retries=3), (Flaky,), (Flaky,))
    assert service.call("forward", submit, repeatable=True) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(remote.RemoteError, match="svc: optim_step failed: connection reset"):
        service.call("optim_step", submit)
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["tinker", "fireworks"])
def test_no_server_is_a_clear_error_within_seconds_before_anything_loads(
        make_config: Any, emulator: Any, tmp_path: Path, backend: str) -> None:
    import socket
    import time

    from preftune import TrainingError, run

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(TrainingError, match=f"cannot reach the service at {url}"):
        run(make_config(backend=backend, lora_rank=4, log_path=str(tmp_path / "noserver"),
                        **{backend: {"base_url": url, "connect_timeout_s": 2}}))
    assert time.monotonic() - start < 15
    assert not (tmp_path / "noserver").exists()


def test_a_timeout_without_a_message_says_what_timed_out() -> None:
    """A cleanup call that times out inside the SDK (an empty TimeoutError) names the call."""
    service = remote.Service("svc", remote.RemoteOptions(api_key_env="K"), (), ())

    def stuck() -> None:
        raise TimeoutError()

    with pytest.raises(remote.RemoteError, match=r"^svc: closing the session: no result within 2 s$"):
        service.run("closing the session", stuck, 2)
    assert remote.describe(TimeoutError()) == "TimeoutError (no message)"


def test_a_call_that_never_returns_is_bounded_and_cannot_hold_the_process() -> None:
    import threading
    import time

    service = remote.Service("svc", remote.RemoteOptions(api_key_env="K"), (), ())
    start = time.monotonic()
    with pytest.raises(remote.RemoteError, match=r"svc: closing a service client: no result within 0.5 s"):
        service.run("closing a service client", threading.Event().wait, 0.5)
    assert time.monotonic() - start < 3
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("preftune-svc"))
