"""The ORPO loss (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
Model"), as in TRL's ORPOTrainer: ``L = NLL(chosen) + lambda * L_OR`` with

    L_OR = -logsigmoid(log_odds(chosen) - log_odds(rejected)),
    log_odds(y) = log P(y) - log(1 - P(y)),

where ``log P(y)`` is the completion's mean per-token log-prob. ``[orpo] nll`` says how the NLL of
the chosen completions is averaged: ``"pair"`` (the default) takes each completion's per-token
mean, then the mean over pairs (the tinker cookbook's ORPO); ``"token"`` takes the mean over every
chosen completion token of the micro-batch, as TRL's ``ORPOTrainer`` does (its cross-entropy over
the batch), so a long completion weighs more. TRL's cross-entropy also counts the chosen prompt's
tokens (all but the first), which a loss here never sees: the two agree when prompts are one token
(docs/losses.md). No reference model is needed.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from preftune import Config, PairLogps, hookimpl

# log P(y) is clamped just below 0: at exactly 0, log(1 - P) is -inf and the odds are infinite.
MAX_LOGP = -1e-6


class ORPOOptions(BaseModel):
    """Options of the ``[orpo]`` table."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(0.1, alias="lambda", ge=0,
                           description="Weight of the odds-ratio term.")
    nll: Literal["pair", "token"] = Field("pair", description=(
        "How the chosen completions' NLL is averaged: 'pair' = per token within each completion, "
        "then over pairs (the cookbook's); 'token' = per token over the micro-batch (TRL's "
        "ORPOTrainer, which also counts prompt tokens: docs/losses.md)."))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative ``x``."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def nll_per_pair(policy: PairLogps) -> torch.Tensor:
    """``[B]``: each chosen completion's mean per-token NLL (the batch NLL is their mean)."""
    return -policy.means()[0]


def nll_per_token(policy: PairLogps) -> torch.Tensor:
    """The mean NLL over every chosen completion token of the micro-batch: one number."""
    return -policy.chosen_token_mean()


NLL = {"pair": nll_per_pair, "token": nll_per_token}


class ORPOLoss:
    needs_reference = False

    def __init__(self, lam: float, nll: str = "pair"):
        self.lam, self.nll = lam, NLL[nll]

    def __call__(self, policy: PairLogps,
                 reference: PairLogps | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw_c_B, raw_r_B = policy.means()
        lp_c_B, lp_r_B = raw_c_B.clamp(max=MAX_LOGP), raw_r_B.clamp(max=MAX_LOGP)
        log_odds_B = (lp_c_B - log1mexp(lp_c_B)) - (lp_r_B - log1mexp(lp_r_B))
        or_loss_B = -F.logsigmoid(log_odds_B)
        nll = self.nll(policy).mean()  # the whole chosen completions
        loss = nll + self.lam * or_loss_B.mean()
        metrics = {
            "nll": nll,
            "or_loss": or_loss_B.mean(),
            "log_odds_ratio": log_odds_B.mean(),
            "accuracy": (log_odds_B > 0).float().mean(),
            "logps_chosen": raw_c_B.mean(),
            "logps_rejected": raw_r_B.mean(),
        }
        return loss, {k: v.detach() for k, v in metrics.items()}


def _orpo(config: Config, options: ORPOOptions) -> ORPOLoss:
    return ORPOLoss(options.lambda_, options.nll)


@hookimpl
def register_losses(register: Any) -> None:
    register("orpo", _orpo, ORPOOptions)
