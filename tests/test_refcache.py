"""The reference cache holds what the loss needs, refuses files of another format, and the
reference model is freed once the cache is complete."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import get_plugin_manager, hookimpl, refcache, run
from preftune.plugins.local import LocalBackend


def cache_file(config: Any) -> Path:
    [found] = list((Path(config.cache_dir) / "reference").glob("*.pt"))
    return found


def test_a_cache_of_the_previous_format_is_stale_and_rebuilt(make_config: Any, capsys: Any) -> None:
    config = make_config()
    run(config)
    path = cache_file(config)
    parts, data = refcache.ReferenceLogps.read(path)
    # the version-1 layout: per-token rows of every pair, no sums, under the same other key parts
    old_parts = {k: v for k, v in parts.items() if k != "per_token"} | {"format_version": "1"}
    n = len(data["chosen_sum"])
    torch.save({"parts": json.dumps(old_parts, sort_keys=True),
                "chosen": torch.full((3 * n,), -1.0), "rejected": torch.full((3 * n,), -2.0),
                "chosen_len": torch.full((n,), 3), "rejected_len": torch.full((n,), 3)}, path)
    capsys.readouterr()
    run(make_config(log_path=str(Path(config.log_path) / "again")))
    err = capsys.readouterr().err
    assert "is stale (format_version, per_token changed); rebuilding" in err
    new_parts, new_data = refcache.ReferenceLogps.read(path)
    assert new_parts == parts
    torch.testing.assert_close(new_data["chosen_sum"], data["chosen_sum"])


def test_a_damaged_cache_is_rebuilt_not_misread(make_config: Any, capsys: Any) -> None:
    config = make_config()
    run(config)
    path = cache_file(config)
    parts, data = refcache.ReferenceLogps.read(path)
    del data["rejected_count"]
    torch.save({"parts": json.dumps(parts, sort_keys=True), **data}, path)
    capsys.readouterr()
    run(make_config(log_path=str(Path(config.log_path) / "again")))
    assert "is damaged" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:100])  # truncated
    run(make_config(log_path=str(Path(config.log_path) / "third")))
    assert "is unreadable" in capsys.readouterr().err


class Probe:
    """A sink that looks at the separate reference model when training starts."""

    refs: list[Any] = []
    alive_at_start: list[bool] = []

    @hookimpl
    def preftune_run_start(self, config: Any, info: Any, backend: Any) -> None:
        gc.collect()
        Probe.alive_at_start.append(any(ref() is not None for ref in Probe.refs))


class ProbePlugin:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("probe", lambda config, options: Probe())


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed", "bf16-true"])
def test_the_separate_reference_model_is_freed_before_training(make_config: Any, monkeypatch: Any,
                                                               precision: str) -> None:
    real = LocalBackend.reference_client

    def remember(self: Any, shared: bool) -> Any:
        client = real(self, shared)
        Probe.refs.append(weakref.ref(client.engine.model))
        return client

    monkeypatch.setattr(LocalBackend, "reference_client", remember)
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(ProbePlugin())
    Probe.refs, Probe.alive_at_start = [], []
    run(make_config(sinks=["probe"], local={"precision": precision}), pm)
    assert len(Probe.refs) == 1 and Probe.alive_at_start == [False]


class TokenLoss:
    """A token-level loss: it asks for per-token values and checks them against the sums."""

    needs_reference = True
    needs_token_logps = True
    seen: list[int] = []

    def __call__(self, policy: Any, reference: Any) -> Any:
        for numbers in (policy, reference):
            assert numbers.tokens is not None
            rows = numbers.tokens.chosen_BT
            torch.testing.assert_close(rows.sum(-1), numbers.chosen, atol=1e-3, rtol=1e-5)
            widest = max(int(numbers.chosen_tokens.max()), int(numbers.rejected_tokens.max()))
            assert rows.shape[1] == numbers.tokens.rejected_BT.shape[1] == widest
        TokenLoss.seen.append(policy.size)
        margin = (policy.tokens.chosen_BT - reference.tokens.chosen_BT).sum(-1) - (
            policy.tokens.rejected_BT - reference.tokens.rejected_BT).sum(-1)
        return -torch.nn.functional.logsigmoid(0.1 * margin).mean(), {}


class TokenPlugin:
    @hookimpl
    def register_losses(self, register: Any) -> None:
        register("token_dpo", lambda config, options: TokenLoss())


def test_a_token_level_loss_gets_per_token_rows_and_they_are_cached(make_config: Any) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(TokenPlugin())
    config = make_config(loss="token_dpo")
    TokenLoss.seen = []
    summary = run(config, pm)
    assert summary["status"] == "completed" and TokenLoss.seen
    parts, data = refcache.ReferenceLogps.read(cache_file(config))
    assert parts["per_token"] == "True" and "chosen_rows" in data
    cached = refcache.ReferenceLogps.from_tensors(data)
    torch.testing.assert_close(torch.stack([r.sum() for r in cached.rows["chosen"]]),
                               cached.sums["chosen"], atol=1e-3, rtol=1e-5)
