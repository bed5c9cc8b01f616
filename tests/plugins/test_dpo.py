"""The DPO loss against the formula, pair by pair."""

from __future__ import annotations

import math

import torch

from preftune import PairLogps, TokenizedPair, collate
from preftune.plugins.dpo import DPOLoss


def batch_of(lengths: list[tuple[int, int, int]]):
    pairs = [TokenizedPair(tuple(range(1, p + 1)), tuple(range(c)), tuple(range(r)),
                           (1.0,) * c, (1.0,) * r) for p, c, r in lengths]
    return collate(pairs, list(range(len(pairs))))


def test_dpo_matches_the_formula_pair_by_pair() -> None:
    batch = batch_of([(3, 2, 4), (2, 5, 1), (4, 1, 1)])
    gen = torch.Generator().manual_seed(0)
    policy = PairLogps.from_rows(-torch.rand(batch.weights.shape, generator=gen) * 3)
    ref = PairLogps.from_rows(-torch.rand(batch.weights.shape, generator=gen) * 3)
    beta = 0.25
    loss, metrics = DPOLoss(beta)(policy, ref, batch)
    w_c, w_r = batch.split(batch.weights)
    margins, losses = [], []
    for i in range(3):
        # only completion tokens count: the prompt's targets have weight 0
        pc, pr = policy.chosen[i][w_c[i] > 0].sum(), policy.rejected[i][w_r[i] > 0].sum()
        rc, rr = ref.chosen[i][w_c[i] > 0].sum(), ref.rejected[i][w_r[i] > 0].sum()
        margins.append(float((pc - rc) - (pr - rr)))
        losses.append(-math.log(1 / (1 + math.exp(-beta * margins[-1]))))
    assert math.isclose(float(loss), sum(losses) / 3, rel_tol=1e-5)
    assert math.isclose(float(metrics["margin"]), sum(margins) / 3, rel_tol=1e-5)
    assert math.isclose(float(metrics["accuracy"]), sum(m > 0 for m in margins) / 3, rel_tol=1e-6)
    assert w_c.sum() == 2 + 5 + 1 and w_r.sum() == 4 + 1 + 1


def test_dpo_is_ln2_at_equal_policy_and_reference_and_rewards_are_beta_log_ratios() -> None:
    batch = batch_of([(2, 3, 3), (2, 2, 4)])
    logps = PairLogps.from_rows(-torch.ones(batch.weights.shape))
    loss, metrics = DPOLoss(0.1)(logps, logps, batch)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    assert float(metrics["accuracy"]) == 0.0 and float(metrics["chosen_reward"]) == 0.0
    shifted = PairLogps(logps.chosen + 0.5 * batch.split(batch.weights)[0], logps.rejected)
    _, metrics = DPOLoss(0.1)(shifted, logps, batch)
    assert math.isclose(float(metrics["chosen_reward"]), 0.1 * 0.5 * (3 + 2) / 2, rel_tol=1e-5)
    assert float(metrics["logps_chosen"]) < 0


def test_dpo_gradient_is_minus_half_beta_on_completion_tokens_at_zero_margin() -> None:
    batch = batch_of([(2, 3, 3), (3, 1, 2)])
    rows = torch.zeros(batch.weights.shape, requires_grad=True)
    ref = PairLogps.from_rows(torch.zeros(batch.weights.shape))
    loss, _ = DPOLoss(0.4)(PairLogps.from_rows(rows), ref, batch)
    loss.backward()
    # d(-logsigmoid(beta m))/dm = -beta * sigmoid(-beta m) = -beta/2 at m = 0; mean over B = 2
    sign = torch.cat([torch.ones(2, 1), -torch.ones(2, 1)])
    expected = -0.4 / 2 / 2 * batch.weights * sign
    torch.testing.assert_close(rows.grad, expected)
