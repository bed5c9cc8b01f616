"""The ORPO loss: formula, numerical stability, options, and a reference-free run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import ConfigError, PairLogps, run
from preftune.plugins.orpo import ORPOLoss, ORPOOptions, log1mexp


def per_token(lengths: list[tuple[int, int]], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return ([-torch.rand(c, generator=gen) * 2 for c, _ in lengths],
            [-torch.rand(r, generator=gen) * 2 for _, r in lengths])


def numbers(chosen: list[torch.Tensor], rejected: list[torch.Tensor]) -> PairLogps:
    """Sums and counts of per-token log-probs, as a backend reports them."""
    return PairLogps(torch.stack([t.sum() for t in chosen]), torch.stack([t.sum() for t in rejected]),
                     torch.tensor([float(len(t)) for t in chosen]),
                     torch.tensor([float(len(t)) for t in rejected]))


def test_orpo_matches_the_paper_and_trl_pair_by_pair() -> None:
    chosen, rejected = per_token([(2, 4), (5, 1)], seed=1)
    loss, metrics = ORPOLoss(0.3)(numbers(chosen, rejected), None)
    expected, nlls = [], []
    for i in range(2):
        lc = chosen[i].mean().item()  # mean per-token log-prob
        lr = rejected[i].mean().item()
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
    chosen = torch.full((3,), value, requires_grad=True)  # chosen at log-prob ~0, rejected at -2
    policy = numbers([chosen], [torch.full((3,), -2.0)])
    loss, metrics = ORPOLoss(0.1)(policy, None)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(chosen.grad).all()
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
    import preftune.weights
    from preftune import refcache
    from preftune.plugins import local

    loads = []
    real_load = preftune.weights.load_causal_lm
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
