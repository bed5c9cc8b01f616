"""IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", eq. 17): a squared loss that regresses the log-ratio margin onto ``1 / (2 tau)``
instead of pushing it to infinity as DPO's sigmoid does::

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
    loss = (h - 1 / (2 * tau)) ** 2

Sequence log-probs are sums over completion tokens as in the paper; ``[ipo] normalize = true``
uses per-token means instead, as TRL's ``loss_type="ipo"`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from preftune import PairLogps, hookimpl


class IPOOptions(BaseModel):
    """The ``[ipo]`` table."""

    model_config = ConfigDict(extra="forbid")
    tau: float = Field(0.1, gt=0, description="Regularization strength; the target margin is 1/(2 tau).")
    normalize: bool = Field(False, description="Use mean instead of summed completion log-probs.")


def completion_logps(logps: PairLogps, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or, with ``normalize``, mean per-token) completion log-probs: two ``[B]``."""
    return logps.means() if normalize else (logps.chosen, logps.rejected)


class IPOLoss:
    needs_reference = True

    def __init__(self, options: IPOOptions):
        self.tau, self.normalize = options.tau, options.normalize

    def __call__(self, policy: PairLogps,
                 reference: PairLogps | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if reference is None:
            raise ValueError("IPO needs reference log-probs")
        pi_c, pi_r = completion_logps(policy, self.normalize)
        ref_c, ref_r = completion_logps(reference, self.normalize)
        margin = (pi_c - ref_c) - (pi_r - ref_r)
        loss = ((margin - 1 / (2 * self.tau)) ** 2).mean()
        metrics = {"margin": margin.mean(), "accuracy": (margin > 0).float().mean(),
                   "logps_chosen": pi_c.mean(), "logps_rejected": pi_r.mean()}
        return loss, {k: v.detach() for k, v in metrics.items()}


@hookimpl
def register_losses(register: Any) -> None:
    register("ipo", lambda config, options: IPOLoss(options), IPOOptions)
