"""One optimizer step and one evaluation, on one process or several: the micro-batches of a step
weighted by their share of its pairs (each rank of several taking its share of every micro-batch),
the step's metrics resolved with one host sync and summed over the ranks, and the held-out metrics.
:func:`preftune.loop.train` calls these once per step."""

from __future__ import annotations

import math
import signal
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from .errors import TrainingError
from .signals import StopSignals
from .types import AdamParams, Loss, Metrics, PairLogps, TokenizedPair, resolve
from .world import World

if TYPE_CHECKING:
    from .config import Config
    from .loop import Data


def train_step(backend: Any, loss: Loss, reference: Any, data: Data, chunk: list[int],
               config: Config, params: AdamParams, step: int, world: World,
               stop: StopSignals) -> tuple[dict[str, float], int | None]:
    """Optimizer step ``step`` on the pairs of ``chunk``, in micro-batches of ``batch_size``
    pairs weighted by their share of the step's pairs, so that the accumulated gradient is the
    gradient of the whole step's mean loss. Under several processes every rank takes its share of
    each micro-batch (:meth:`World.share`); its weight is multiplied by the number of ranks, as
    DDP and FSDP average gradients over them. Returns the step's metrics (summed over the ranks)
    and the stop signal any rank received by the end of the step."""
    submitted = []
    micros = chunks(chunk, config.batch_size)
    for k, micro in enumerate(micros):
        index, stand_in = world.share(micro)
        ref = reference.select(index) if reference is not None else None
        part = 0.0 if stand_in else len(index) / len(chunk)
        bound = BoundLoss(loss, ref, part * world.size, syncs=k == len(micros) - 1,
                          token_total=share_tokens(data.pairs, micro, index, world, stand_in))
        with world.collective(f"step {step}"):
            out = backend.forward_backward([data.pairs[i] for i in index], bound)
        submitted.append((out, part))
    with world.collective(f"step {step}"):
        metrics = optimizer_step(backend, submitted, params, step, [data.pairs[i] for i in chunk],
                                 world.size)
    if world.size == 1:
        return metrics, stop.signum
    shared = [k for k in metrics if k not in STEP_METRICS]  # the loss's: summed over the ranks
    *sums, terms, ints = world.sum([metrics[k] for k in shared] + stop_flags(stop.signum))
    metrics.update(zip(shared, sums))
    check_finite(metrics, step, [data.pairs[i] for i in chunk])
    return metrics, signal.SIGTERM if terms else signal.SIGINT if ints else None


def stop_flags(signum: int | None) -> list[float]:
    """Whether this rank was asked to stop by SIGTERM, by Ctrl-C (summed over the ranks)."""
    return [float(signum == signal.SIGTERM), float(signum == signal.SIGINT)]


def agreed_stop(world: World, signum: int | None) -> int | None:
    """The stop signal any rank has received (SIGTERM before Ctrl-C), so all stop together."""
    if world.size == 1:
        return signum
    terms, ints = world.sum(stop_flags(signum))
    return signal.SIGTERM if terms else signal.SIGINT if ints else None


def token_level(loss: Loss) -> bool:
    """Whether ``loss`` asked for per-token log-probs (most losses need sums and counts only)."""
    return bool(getattr(loss, "needs_token_logps", False))


class BoundLoss:
    """The loss of one micro-batch: its reference numbers bound, scaled by its share of the
    step's pairs, so the accumulated gradient is the gradient of the whole step's mean loss.
    ``syncs`` tells a backend of several processes that this is the step's last micro-batch (the
    one after which DDP or FSDP synchronise the gradients)."""

    def __init__(self, loss: Loss, reference: PairLogps | None, weight: float, syncs: bool = True,
                 token_total: float | None = None):
        self.loss, self.reference, self.weight = loss, reference, weight
        self.needs_token_logps = token_level(loss)
        self.syncs = syncs  # the step's last micro-batch: gradients are synchronised after it
        self.token_total = token_total  # a rank's share: see PairLogps.chosen_token_mean

    def __call__(self, policy: PairLogps) -> tuple[torch.Tensor, Metrics]:
        if self.token_total is not None:
            policy = replace(policy, token_total=self.token_total)
        ref = self.reference.to(policy.chosen.device) if self.reference is not None else None
        value, metrics = self.loss(policy, ref)
        return value * self.weight, {"loss": value.detach(), **metrics}


def share_tokens(pairs: Sequence[TokenizedPair], batch: list[int], index: list[int], world: World,
                 stand_in: bool) -> float | None:
    """Under several processes, the part of ``batch``'s chosen completion tokens that this rank's
    share (``index``) stands for in a per-token mean (:meth:`PairLogps.chosen_token_mean`): all of
    them times the share's pairs over the batch's. None for one process (the share is the batch)."""
    if world.size == 1 or stand_in:
        return None
    return sum(sum(pairs[i].chosen_weights) for i in batch) * len(index) / len(batch)


def evaluate_pairs(backend: Any, loss: Loss, reference: Any, data: Data,
                   config: Config, world: World | None = None) -> dict[str, float]:
    """Held-out metrics (``eval_`` + each loss metric), means over the held-out pairs (each
    rank of several computes its share of every batch; the sums are added up)."""
    world = world or World()
    if not data.eval:
        return {}
    submitted = []
    for batch in data.eval_batches(eval_batch_size(config)):
        index, stand_in = world.share(batch)
        with world.collective("evaluating"):
            out = backend.forward([data.pairs[i] for i in index], token_level(loss))
        ref = reference.select(index) if reference is not None else None
        submitted.append((out, ref, 0.0 if stand_in else len(index) / len(data.eval),
                          share_tokens(data.pairs, batch, index, world, stand_in)))
    with torch.no_grad():
        results = [(BoundLoss(loss, ref, 1.0, token_total=tokens)(resolve(out))[1], weight)
                   for out, ref, weight, tokens in submitted]
    metrics = resolve_metrics(results)
    metrics = dict(zip(metrics, world.sum(list(metrics.values()))))
    return {f"eval_{k}": v for k, v in metrics.items()}


def eval_batch_size(config: Config) -> int:
    """Forward-only batches (reference pass, evaluation) hold no activations: make them larger."""
    return max(2 * config.batch_size, 8)


def resolve_metrics(submitted: Sequence[tuple[Any, float]]) -> dict[str, float]:
    """Weighted sums of metrics (dicts, or futures of dicts, of tensors or floats) as floats,
    with a single host sync for all tensors."""
    totals: dict[str, Any] = {}
    for out, weight in submitted:
        for key, value in resolve(out).items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else value
            totals[key] = totals.get(key, 0.0) + value * weight
    keys = list(totals)
    tensors = [k for k in keys if isinstance(totals[k], torch.Tensor)]
    device = totals[tensors[0]].device if tensors else None
    stacked = [totals[k].reshape(()).to(device) for k in tensors]
    values = torch.stack(stacked).tolist() if tensors else []
    out = {k: float(totals[k]) for k in keys if k not in tensors}
    out.update(zip(tensors, values))
    return {k: out[k] for k in keys}


STEP_METRICS = ("grad_norm", "step_skipped")  # the optimizer's: the same on every rank


def optimizer_step(backend: Any, submitted: list[tuple[Any, float]], params: AdamParams, step: int,
                   pairs: Sequence[TokenizedPair], ranks: int = 1) -> dict[str, float]:
    """Apply optimizer step ``step`` to the gradient of the ``submitted`` micro-batches; their
    metrics and the step's, with the step's one host sync. A NaN or infinite loss or gradient is
    never applied: a backend that keeps it out of the weights itself (``guards_nonfinite``: the
    local one, on the device) is stepped before the sync; any other only once the loss is known to
    be finite. A step the backend skipped (``step_skipped``: fp16 overflow) is no error. Under
    several ``ranks`` the loss is checked once summed over them (by the caller)."""
    if getattr(backend, "guards_nonfinite", False):
        metrics = resolve_metrics([*submitted, (backend.optim_step(params), 1.0)])  # host sync
    else:
        metrics = resolve_metrics(submitted)  # host sync: the service must not apply a NaN
        check_finite(metrics, step, pairs)
        metrics.update(resolve_metrics([(backend.optim_step(params), 1.0)]))
    if metrics.get("step_skipped"):
        metrics.pop("grad_norm", None)  # the norm of an overflowed gradient measures nothing
    if ranks == 1:
        check_finite(metrics, step, pairs)
    return metrics


def check_finite(metrics: dict[str, Any], step: int, pairs: Sequence[TokenizedPair]) -> None:
    """A NaN or infinite loss or gradient stops the run (its step was not applied)."""
    for key, what in (("loss", "loss"), ("grad_norm", "gradient norm")):
        if key in metrics and not math.isfinite(float(metrics[key])):
            where = ", ".join(str(p.source) for p in pairs[:8])
            raise TrainingError(f"{what} is {float(metrics[key])} at step {step}; the step was not "
                                f"applied; pairs: {where}")


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
