"""The ORPO loss: formula, numerical stability, options, and a reference-free run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import ConfigError, PairLogps, TokenizedPair, collate, run
from preftune.plugins.orpo import ORPOLoss, ORPOOptions, log1mexp


def batch_of(lengths: list[tuple[int, int, int]]) -> Any:
    pairs = [TokenizedPair(tuple(range(1, p + 1)), tuple(range(c)), tuple(range(r)),
                           (1.0,) * c, (1.0,) * r) for p, c, r in lengths]
    return collate(pairs, list(range(len(pairs))))


def test_orpo_matches_the_paper_and_trl_pair_by_pair() -> None:
    batch = batch_of([(3, 2, 4), (2, 5, 1)])
    gen = torch.Generator().manual_seed(1)
    policy = PairLogps.from_rows(-torch.rand(batch.weights.shape, generator=gen) * 2)
    loss, metrics = ORPOLoss(0.3)(policy, None, batch)
    w_c, w_r = batch.split(batch.weights)
    expected, nlls = [], []
    for i in range(2):
        lc = policy.chosen[i][w_c[i] > 0].mean().item()  # mean per-token log-prob
        lr = policy.rejected[i][w_r[i] > 0].mean().item()
        log_odds = (lc - math.log(1 - math.exp(lc))) - (lr - math.log(1 - math.exp(lr)))
        or_loss = -math.log(1 / (1 + math.exp(-log_odds)))
        nlls.append(-lc)
        expected.append(-lc + 0.3 * or_loss)
    assert math.isclose(float(loss), sum(expected) / 2, rel_tol=1e-5)  # mean, not sum
    assert math.isclose(float(metrics["nll"]), sum(nlls) / 2, rel_tol=1e-5)


def test_log1mexp_is_stable_where_naive_forms_fail() -> None:
    x = torch.tensor([-1e-9, -1e-6, -0.5, -1.0, -30.0, -100.0], dtype=torch.float32)
    out = log1mexp(x)
    assert torch.isfinite(out).all()
    expected = torch.log(-torch.expm1(x.double())).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, -1e-9])
def test_loss_and_gradient_stay_finite_at_logp_zero(value: float) -> None:
    batch = batch_of([(2, 3, 3)])
    rows = torch.full(batch.weights.shape, value, requires_grad=True)
    other = torch.full(batch.weights.shape, -2.0)
    rows_mixed = torch.cat([rows[:1], other[1:]])  # chosen at log-prob ~0, rejected at -2
    loss, metrics = ORPOLoss(0.1)(PairLogps.from_rows(rows_mixed), None, batch)
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(rows.grad).all()
    assert float(metrics["accuracy"]) == 1.0


def test_orpo_options_use_the_lambda_key(registry: Any) -> None:
    from preftune import Config

    config = Config(base_model="builtin:tiny", dataset="d", loss="orpo", orpo={"lambda": 0.5})
    assert config.check_plugin_tables(registry)["orpo"].lambda_ == 0.5
    assert ORPOOptions().lambda_ == 0.1
    with pytest.raises(ConfigError, match="orpo.lambda"):
        Config(base_model="builtin:tiny", dataset="d", orpo={"lambda": -1}).check_plugin_tables(
            registry)


def test_orpo_run_loads_one_model_and_does_no_reference_forward(
    make_config: Any, monkeypatch: Any
) -> None:
    import preftune.hub
    from preftune import refcache
    from preftune.plugins import local

    loads = []
    real_load = preftune.hub.load_causal_lm
    monkeypatch.setattr(local, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(refcache, "compute", lambda *a, **k: pytest.fail("reference forward"))
    config = make_config(loss="orpo", epochs=4, learning_rate=3e-3, orpo={"lambda": 1.0})
    summary = run(config)
    assert len(loads) == 1
    assert not (Path(config.cache_dir) / "reference").exists()
    first, last = summary["initial_eval"], summary["final_eval"]
    assert {"eval_loss", "eval_nll", "eval_or_loss", "eval_log_odds_ratio",
            "eval_accuracy"} <= set(last)
    assert last["eval_loss"] < first["eval_loss"] and last["eval_nll"] < first["eval_nll"]
