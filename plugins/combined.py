"""A weighted sum of registered losses: TRL's ``loss_type=[...]`` with ``loss_weights`` (MPO).

``loss = "combined"`` with ``[combined] losses = ["dpo", "bco_pair"]`` and ``weights = [0.8, 0.2]``
trains on ``0.8 * dpo + 0.2 * bco_pair``. Each part is built as the run builds its loss
(``registry.build``), so each reads its own options table (``[rpo] alpha``) and the shared
``beta``. TRL's Mixed Preference Optimization (``["sigmoid", "bco_pair", "sft"]``,
``[0.8, 0.2, 1.0]``) is ``losses = ["rpo", "bco_pair"]``, ``weights = [0.8, 0.2]`` with
``[rpo] alpha = 1.25`` (docs/losses.md).
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from preftune import Config, ConfigError, Loss, PairLogps, hookimpl

NAME = "combined"


class CombinedOptions(BaseModel):
    """Options of the ``[combined]`` table."""

    model_config = ConfigDict(extra="forbid")
    losses: list[str] = Field([], description=(
        "Names of the registered losses to add up (at least one, each once, not `combined`). "
        "Each reads its own options table and the top-level `beta`. TRL's `loss_type` list."))
    weights: list[float] | None = Field(None, description=(
        "Weight of each loss, in the order of `losses` (same length, each >= 0); None = all 1.0. "
        "TRL's `loss_weights`."))


def config_error(config: Config, key: str, message: str) -> ConfigError:
    """An error naming ``key``, and the --set that gave it if one did."""
    origin = config.origin(key)
    return ConfigError((f"{origin}: " if origin else "") + f"field {key!r}: {message}")


def check_names(config: Config, names: list[str], known: list[str]) -> None:
    """The parts: at least one, each registered, none twice, not ``combined`` itself."""
    key = f"{NAME}.losses"
    if not names:
        raise config_error(config, key, f"list at least one loss to combine (known: {', '.join(known)})")
    if NAME in names:
        raise config_error(config, key, f"a {NAME!r} loss cannot contain itself")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise config_error(config, key, f"unknown loss {unknown[0]!r}; known losses: {', '.join(known)}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise config_error(config, key, f"{twice[0]!r} is listed twice: give it one weight instead")


def check_weights(config: Config, names: list[str], weights: list[float] | None) -> list[float]:
    """The weights, one per part and none negative; all 1.0 when not given."""
    if weights is None:
        return [1.0] * len(names)
    key = f"{NAME}.weights"
    if len(weights) != len(names):
        raise config_error(config, key, f"{len(weights)} weights for the {len(names)} losses of "
                           f"{NAME}.losses ({', '.join(names)}): give one each")
    if any(w < 0 for w in weights):
        raise config_error(config, key, f"weights must be >= 0, got {weights}")
    return list(weights)


class CombinedLoss:
    """``sum(weight * part(policy, reference))``: a :class:`preftune.Loss` made of losses.

    Metrics: the first part's, plus ``loss_<name>`` (each part's own, unweighted loss)."""

    def __init__(self, parts: dict[str, Loss], weights: list[float]):
        self.parts, self.weights = parts, weights
        self.needs_reference = any(part.needs_reference for part in parts.values())
        self.needs_token_logps = any(getattr(part, "needs_token_logps", False)
                                     for part in parts.values())

    def __call__(self, policy: PairLogps,
                 reference: PairLogps | None) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for (name, part), weight in zip(self.parts.items(), self.weights):
            value, part_metrics = part(policy, reference if part.needs_reference else None)
            metrics = metrics or dict(part_metrics)  # the first part's
            metrics[f"loss_{name}"] = value.detach()
            total = weight * value if total is None else total + weight * value
        assert total is not None  # the factory refuses an empty list
        return total, metrics


def build(registry: Any, config: Config, options: CombinedOptions) -> CombinedLoss:
    """The ``combined`` factory, bound to the run's registry (``register_losses``'s argument)."""
    check_names(config, options.losses, registry.names("loss"))
    weights = check_weights(config, options.losses, options.weights)
    parts = {name: registry.build("loss", name, config) for name in options.losses}
    return CombinedLoss(parts, weights)


@hookimpl
def register_losses(register: Any, registry: Any) -> None:
    register(NAME, functools.partial(build, registry), CombinedOptions)
