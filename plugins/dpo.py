"""The DPO loss (Rafailov et al. 2023): ``-logsigmoid(beta * margin)`` over a whole batch.

``margin = (pi_c - ref_c) - (pi_r - ref_r)`` where each term is the weighted sum of the
completion's per-token log-probs (weights are 1 on completion tokens, 0 on the prompt).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from preftune import Batch, Config, PairLogps, hookimpl


def weighted_sums(logps: PairLogps, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sums of completion log-probs: two ``[B]`` tensors."""
    w_chosen, w_rejected = batch.split(batch.weights.to(logps.chosen.device))
    return (logps.chosen * w_chosen).sum(-1), (logps.rejected * w_rejected).sum(-1)


class DPOLoss:
    """Sigmoid DPO. Metrics are batch means; rewards are ``beta`` times the log ratios."""

    needs_reference = True

    def __init__(self, beta: float):
        self.beta = beta

    def __call__(
        self, policy: PairLogps, reference: PairLogps | None, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if reference is None:
            raise ValueError("DPO needs reference log-probs")
        pi_c_B, pi_r_B = weighted_sums(policy, batch)
        ref_c_B, ref_r_B = weighted_sums(reference, batch)
        chosen_ratio_B, rejected_ratio_B = pi_c_B - ref_c_B, pi_r_B - ref_r_B
        margin_B = chosen_ratio_B - rejected_ratio_B
        loss = -F.logsigmoid(self.beta * margin_B).mean()
        with torch.no_grad():
            metrics = {
                "margin": margin_B.mean(),
                "accuracy": (margin_B > 0).float().mean(),
                "chosen_reward": self.beta * chosen_ratio_B.mean(),
                "rejected_reward": self.beta * rejected_ratio_B.mean(),
                "logps_chosen": pi_c_B.mean(),
                "logps_rejected": pi_r_B.mean(),
            }
        return loss, {k: v.detach() for k, v in metrics.items()}


def _dpo(config: Config, options: Any) -> DPOLoss:
    return DPOLoss(config.beta)


@hookimpl
def register_losses(register: Any) -> None:
    register("dpo", _dpo)
