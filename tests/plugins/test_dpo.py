"""The DPO loss against the formula, pair by pair."""

from __future__ import annotations

import math

import torch

from preftune import PairLogps
from preftune.plugins.dpo import DPOLoss


def numbers(chosen: list[float], rejected: list[float], counts: tuple[int, int] = (3, 3)) -> PairLogps:
    n = len(chosen)
    return PairLogps(torch.tensor(chosen), torch.tensor(rejected),
                     torch.full((n,), float(counts[0])), torch.full((n,), float(counts[1])))


def test_dpo_matches_the_formula_pair_by_pair() -> None:
    gen = torch.Generator().manual_seed(0)
    pol = [(-torch.rand(3, generator=gen) * 9).tolist() for _ in range(2)]
    ref = [(-torch.rand(3, generator=gen) * 9).tolist() for _ in range(2)]
    beta = 0.25
    loss, metrics = DPOLoss(beta)(numbers(*pol), numbers(*ref))
    margins = [(pol[0][i] - ref[0][i]) - (pol[1][i] - ref[1][i]) for i in range(3)]
    losses = [-math.log(1 / (1 + math.exp(-beta * m))) for m in margins]
    assert math.isclose(float(loss), sum(losses) / 3, rel_tol=1e-5)
    assert math.isclose(float(metrics["margin"]), sum(margins) / 3, rel_tol=1e-5)
    assert math.isclose(float(metrics["accuracy"]), sum(m > 0 for m in margins) / 3, rel_tol=1e-6)
    assert math.isclose(float(metrics["logps_chosen"]), sum(pol[0]) / 3, rel_tol=1e-5)


def test_dpo_is_ln2_at_equal_policy_and_reference_and_rewards_are_beta_log_ratios() -> None:
    logps = numbers([-3.0, -2.0], [-3.0, -4.0])
    loss, metrics = DPOLoss(0.1)(logps, logps)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    assert float(metrics["accuracy"]) == 0.0 and float(metrics["chosen_reward"]) == 0.0
    shifted = numbers([-3.0 + 1.5, -2.0 + 1.0], [-3.0, -4.0])
    _, metrics = DPOLoss(0.1)(shifted, logps)
    assert math.isclose(float(metrics["chosen_reward"]), 0.1 * (1.5 + 1.0) / 2, rel_tol=1e-5)
    assert float(metrics["logps_chosen"]) < 0


def test_dpo_gradient_is_minus_half_beta_per_sequence_at_zero_margin() -> None:
    sums = torch.zeros(2, 2, requires_grad=True)  # [chosen, rejected] x B = 2
    policy = PairLogps(sums[0], sums[1], torch.ones(2), torch.ones(2))
    loss, _ = DPOLoss(0.4)(policy, numbers([0.0, 0.0], [0.0, 0.0]))
    loss.backward()
    # d(-logsigmoid(beta m))/dm = -beta * sigmoid(-beta m) = -beta/2 at m = 0; mean over B = 2
    torch.testing.assert_close(sums.grad, torch.tensor([[-0.1, -0.1], [0.1, 0.1]]))
