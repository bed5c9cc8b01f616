"""TRL's DPO loss variants, each a few lines of per-sequence arithmetic (docs/losses.md).

Every variant is a function of per-pair rewards: the log ratios ``pi - ref`` of chosen and
rejected (sums of completion log-probs, as TRL 1.16's ``DPOTrainer`` uses them), or, for the
reference-free ``simpo`` and ``sft``, the policy's per-token mean log-probs. Each returns the
per-pair loss; the batch loss is its mean over pairs, as in TRL. Each matches TRL 1.16's
``loss_type`` of the same name (``cdpo`` and ``simpo``: TRL's ``CPOTrainer.cpo_loss``; ``rpo``:
``loss_type=["sigmoid", "sft"]``; ``sft``: the chosen completions' NLL per token), which
tests/plugins/test_dpo_variants.py checks to 1e-6, value and gradient.

The variants are rows of :data:`VARIANTS`, registered in a loop: no ladder of names.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from preftune import Config, PairLogps, hookimpl, log


@dataclass(frozen=True)
class Rewards:
    """The per-pair numbers a variant is a function of: ``chosen_B`` and ``rejected_B`` (log
    ratios, or mean log-probs for a reference-free variant) and the policy's own numbers."""

    chosen_B: Tensor
    rejected_B: Tensor
    policy: PairLogps

    @property
    def margin_B(self) -> Tensor:
        return self.chosen_B - self.rejected_B


def log_ratios(policy: PairLogps, reference: PairLogps | None) -> Rewards:
    """``pi - ref`` of chosen and rejected: sums of completion log-probs, as TRL's DPO uses."""
    if reference is None:
        raise ValueError("this loss needs reference log-probs")
    return Rewards(policy.chosen - reference.chosen, policy.rejected - reference.rejected, policy)


def mean_logps(policy: PairLogps, reference: PairLogps | None) -> Rewards:
    """The policy's per-token mean log-probs (SimPO's length-normalised, reference-free reward)."""
    chosen_B, rejected_B = policy.means()
    return Rewards(chosen_B, rejected_B, policy)


def preference_metrics(beta: float, rewards: Rewards) -> dict[str, Tensor]:
    """The metrics every variant reports, with DPO's keys: means over the pairs, detached."""
    margin_B = rewards.margin_B
    metrics = {
        "margin": margin_B.mean(),
        "accuracy": (margin_B > 0).float().mean(),
        "chosen_reward": beta * rewards.chosen_B.mean(),
        "rejected_reward": beta * rewards.rejected_B.mean(),
        "logps_chosen": rewards.policy.chosen.mean(),
        "logps_rejected": rewards.policy.rejected.mean(),
    }
    return {k: v.detach() for k, v in metrics.items()}


# ---- options tables ------------------------------------------------------------------------------

class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RobustOptions(_Options):
    """Options of the ``[robust]`` table."""

    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "Probability that a preference label is flipped (the Robust DPO paper's epsilon; it "
        "suggests 0.1), in [0, 0.5). TRL's `label_smoothing`."))


class CDPOOptions(_Options):
    """Options of the ``[cdpo]`` table."""

    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "Conservative DPO's epsilon, in [0, 0.5): the target probability that the rejected is the "
        "better one. 0 = plain DPO. TRL's `label_smoothing` with `loss_type='sigmoid'` before 1.0."))


class SimPOOptions(_Options):
    """Options of the ``[simpo]`` table."""

    gamma: float = Field(0.5, ge=0, description=(
        "Target reward margin: loss = -logsigmoid(beta * (mean_c - mean_r) - gamma). TRL's "
        "`simpo_gamma` (SimPO's gamma_beta_ratio 0.25 times its beta 2.0)."))
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "As `[cdpo] label_smoothing`, applied to SimPO's logits; 0 = SimPO as published."))


class RPOOptions(_Options):
    """Options of the ``[rpo]`` table."""

    alpha: float = Field(1.0, ge=0, description=(
        "Weight of the NLL of the chosen completions (per token over the micro-batch): loss = "
        "DPO + alpha * NLL. TRL's `rpo_alpha`; the RPO paper uses 1."))


class EXOOptions(_Options):
    """Options of the ``[exo_pair]`` table."""

    label_smoothing: float = Field(1e-3, gt=0, lt=1, description=(
        "EXO's epsilon, in (0, 1): the target distribution is (1 - epsilon, epsilon) over "
        "(chosen, rejected). The paper recommends 1e-3. TRL's `label_smoothing` (which must be > 0)."))


class DiscoPOPOptions(_Options):
    """Options of the ``[discopop]`` table."""

    tau: float = Field(0.05, gt=0, description=(
        "Temperature of the mix between the logistic and the exponential loss. TRL's `discopop_tau`; "
        "the paper's value is 0.05."))


# ---- the variants: each the per-pair loss [B] --------------------------------------------------

def smoothed_sigmoid(logits_B: Tensor, epsilon: float) -> Tensor:
    """``-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)``: DPO with label smoothing."""
    return -F.logsigmoid(logits_B) * (1 - epsilon) - F.logsigmoid(-logits_B) * epsilon


def hinge(r: Rewards, beta: float, o: None) -> Tensor:
    return torch.relu(1 - beta * r.margin_B)


def robust(r: Rewards, beta: float, o: RobustOptions) -> Tensor:
    eps = o.label_smoothing
    clean_B = -(1 - eps) * F.logsigmoid(beta * r.margin_B)
    flipped_B = -eps * F.logsigmoid(-beta * r.margin_B)
    return (clean_B - flipped_B) / (1 - 2 * eps)


def cdpo(r: Rewards, beta: float, o: CDPOOptions) -> Tensor:
    return smoothed_sigmoid(beta * r.margin_B, o.label_smoothing)


def simpo(r: Rewards, beta: float, o: SimPOOptions) -> Tensor:
    return smoothed_sigmoid(beta * (r.margin_B - o.gamma / beta), o.label_smoothing)


def chosen_nll(policy: PairLogps) -> Tensor:
    """TRL's "sft" term: the mean NLL over all chosen tokens of the micro-batch, one number."""
    return -policy.chosen_token_mean()


def sft(r: Rewards, beta: float, o: None) -> Tensor:
    # one number for the micro-batch, as TRL expands it over the pairs (their mean is itself)
    return chosen_nll(r.policy).expand(r.chosen_B.shape)


def rpo(r: Rewards, beta: float, o: RPOOptions) -> Tensor:
    return -F.logsigmoid(beta * r.margin_B) + o.alpha * chosen_nll(r.policy)


def bco_pair(r: Rewards, beta: float, o: None) -> Tensor:
    # TRL 1.16 has no running reward mean (delta) any more: it is 0 here as there
    return -F.logsigmoid(beta * r.chosen_B) - F.logsigmoid(-beta * r.rejected_B)


def sppo_hard(r: Rewards, beta: float, o: None) -> Tensor:
    return (r.chosen_B - 0.5 / beta) ** 2 + (r.rejected_B + 0.5 / beta) ** 2


def nca_pair(r: Rewards, beta: float, o: None) -> Tensor:
    chosen_B, rejected_B = beta * r.chosen_B, beta * r.rejected_B
    return -F.logsigmoid(chosen_B) - 0.5 * F.logsigmoid(-chosen_B) - 0.5 * F.logsigmoid(-rejected_B)


def apo_zero(r: Rewards, beta: float, o: None) -> Tensor:
    return 1 - torch.sigmoid(beta * r.chosen_B) + torch.sigmoid(beta * r.rejected_B)


def apo_down(r: Rewards, beta: float, o: None) -> Tensor:
    return torch.sigmoid(beta * r.chosen_B) + 1 - torch.sigmoid(beta * r.margin_B)


def exo_pair(r: Rewards, beta: float, o: EXOOptions) -> Tensor:
    # KL((q_w, q_l) || (1 - eps, eps)) with q = softmax of beta * the log ratios
    eps, logits_B = o.label_smoothing, beta * r.margin_B
    chosen_B = torch.sigmoid(logits_B) * (F.logsigmoid(logits_B) - math.log1p(-eps))
    rejected_B = torch.sigmoid(-logits_B) * (F.logsigmoid(-logits_B) - math.log(eps))
    return chosen_B + rejected_B


def discopop(r: Rewards, beta: float, o: DiscoPOPOptions) -> Tensor:
    logits_B = beta * r.margin_B
    mix_B = torch.sigmoid(logits_B / o.tau)
    return -F.logsigmoid(logits_B) * (1 - mix_B) + torch.exp(-logits_B) * mix_B


# ---- the table and its registration -------------------------------------------------------------

PerPair = Callable[[Rewards, float, Any], Tensor]
SIMPO_BETA = 2.0  # SimPO's default (princeton-nlp/SimPO), used when the config leaves `beta` unset


@dataclass(frozen=True)
class Variant:
    """One row of :data:`VARIANTS`: the per-pair loss, its options table and its rewards."""

    per_pair: PerPair
    options: type[BaseModel] | None = None
    rewards: Callable[[PairLogps, PairLogps | None], Rewards] = log_ratios
    default_beta: float | None = None  # None: the config's `beta` (0.1 unless set)

    @property
    def needs_reference(self) -> bool:
        return self.rewards is log_ratios


VARIANTS: dict[str, Variant] = {
    "hinge": Variant(hinge),
    "robust": Variant(robust, RobustOptions),
    "cdpo": Variant(cdpo, CDPOOptions),
    "simpo": Variant(simpo, SimPOOptions, mean_logps, default_beta=SIMPO_BETA),
    "rpo": Variant(rpo, RPOOptions),
    "bco_pair": Variant(bco_pair),
    "sppo_hard": Variant(sppo_hard),
    "nca_pair": Variant(nca_pair),
    "apo_zero": Variant(apo_zero),
    "apo_down": Variant(apo_down),
    "exo_pair": Variant(exo_pair, EXOOptions),
    "discopop": Variant(discopop, DiscoPOPOptions),
    # the chosen NLL alone: no reference; its metrics compare the per-token means, as simpo's
    "sft": Variant(sft, rewards=mean_logps),
}


class VariantLoss:
    """A :data:`VARIANTS` row bound to its ``beta`` and options: a :class:`preftune.Loss`."""

    def __init__(self, variant: Variant, beta: float, options: BaseModel | None = None):
        self.variant, self.beta, self.options = variant, beta, options
        self.needs_reference = variant.needs_reference

    def __call__(self, policy: PairLogps,
                 reference: PairLogps | None) -> tuple[Tensor, dict[str, Tensor]]:
        rewards = self.variant.rewards(policy, reference)
        loss = self.variant.per_pair(rewards, self.beta, self.options).mean()
        return loss, preference_metrics(self.beta, rewards)


def variant_beta(name: str, variant: Variant, config: Config) -> float:
    """The config's ``beta`` when the user set it, else the variant's own default if it has one."""
    if variant.default_beta is None or "beta" in config.model_fields_set:
        return config.beta
    log(f"loss {name!r}: beta is not set, so it is {variant.default_beta} ({name}'s default)")
    return variant.default_beta


def build(name: str, config: Config, options: BaseModel | None) -> VariantLoss:
    """The factory of variant ``name`` (registered bound to its name)."""
    variant = VARIANTS[name]
    return VariantLoss(variant, variant_beta(name, variant, config), options)


@hookimpl
def register_losses(register: Any) -> None:
    for name, variant in VARIANTS.items():
        register(name, functools.partial(build, name), variant.options)
