"""The DPO loss (Rafailov et al. 2023): ``-logsigmoid(beta * margin)``, the mean over pairs.

``margin = (pi_c - ref_c) - (pi_r - ref_r)`` where each term is the sum of the completion's
per-token log-probs (prompt tokens excluded), for the policy (``pi``) and the reference (``ref``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from preftune import Config, PairLogps, hookimpl


class DPOLoss:
    """Sigmoid DPO. Metrics are means over pairs; rewards are ``beta`` times the log ratios."""

    needs_reference = True

    def __init__(self, beta: float):
        self.beta = beta

    def __call__(
        self, policy: PairLogps, reference: PairLogps | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if reference is None:
            raise ValueError("DPO needs reference log-probs")
        chosen_ratio_B = policy.chosen - reference.chosen
        rejected_ratio_B = policy.rejected - reference.rejected
        margin_B = chosen_ratio_B - rejected_ratio_B
        loss = -F.logsigmoid(self.beta * margin_B).mean()
        metrics = {
            "margin": margin_B.mean(),
            "accuracy": (margin_B > 0).float().mean(),
            "chosen_reward": self.beta * chosen_ratio_B.mean(),
            "rejected_reward": self.beta * rejected_ratio_B.mean(),
            "logps_chosen": policy.chosen.mean(),
            "logps_rejected": policy.rejected.mean(),
        }
        return loss, {k: v.detach() for k, v in metrics.items()}


def _dpo(config: Config, options: Any) -> DPOLoss:
    return DPOLoss(config.beta)


@hookimpl
def register_losses(register: Any) -> None:
    register("dpo", _dpo)
