"""Precision of the ``local`` backend: which dtype each tensor is stored, computed and stepped in.

Lightning's names. ``fp32``: everything float32. ``bf16-mixed`` / ``fp16-mixed``: the parameters
that train keep float32 masters and float32 AdamW state, the model's forward runs under
``torch.autocast`` in the low dtype, and frozen weights (the LoRA base) are stored in it; a
full fine-tune's separate reference is stored as its policy is, so the two agree at step 0.
``fp16-mixed`` scales the loss (``torch.amp.GradScaler``): a step whose gradients
overflow is skipped and counted, not an error. ``bf16-true``: weights, gradients and AdamW state
in bfloat16, the update applied with Kahan summation (:class:`KahanAdamW`) so small updates
accumulate instead of rounding away.

Log-prob sums, losses, metrics and the reference cache are float32 in every precision (the engine
takes the log-softmax outside autocast). :class:`Stepper` is one optimizer step with no host
sync: a non-finite gradient norm is never applied (the fused AdamW's ``found_inf``), and the
step's metrics are device tensors that the loop resolves in its one sync.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from preftune import AdamParams

KAHAN_CHUNK = 1 << 22  # elements per slice of a parameter in a bf16-true step (bounds float32 copies)


@dataclass(frozen=True)
class Precision:
    """One ``[local] precision``: the dtypes of computation, trainable and frozen weights."""

    name: str
    compute: torch.dtype  # autocast dtype of the forward (float32: no autocast)
    master: torch.dtype  # trainable parameters, their gradients and AdamW state
    scaled: bool = False  # loss scaling (float16 gradients underflow without it)

    @property
    def frozen(self) -> torch.dtype:
        """Weights that never train (the LoRA base) need no master copy."""
        return self.compute

    @property
    def compensated(self) -> bool:
        """Whether updates are applied to low-precision weights (Kahan summation)."""
        return self.master != torch.float32

    def load_dtype(self, trains: bool) -> torch.dtype:
        """The dtype to load a model in: masters if all of it trains, else the frozen dtype."""
        return self.master if trains else self.frozen


PRECISIONS = {p.name: p for p in (
    Precision("fp32", torch.float32, torch.float32),
    Precision("bf16-mixed", torch.bfloat16, torch.float32),
    Precision("bf16-true", torch.bfloat16, torch.bfloat16),
    Precision("fp16-mixed", torch.float16, torch.float32, scaled=True),
)}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
REPLACED_DTYPES = {"float32": "'fp32'", "bfloat16": "'bf16-true' (or 'bf16-mixed')",
                   "float16": "'fp16-mixed'"}


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16-mixed on a CUDA device with bfloat16, else fp32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return PRECISIONS["bf16-mixed" if bf16 else "fp32"]
    return PRECISIONS[name]


def precision_problem(name: str, device: torch.device) -> str | None:
    """Why ``name`` cannot run on ``device`` (a GPU without bfloat16), or None."""
    if name in ("bf16-mixed", "bf16-true") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{name!r}: this GPU does not support bfloat16; use 'fp16-mixed' or 'fp32'"
    return None


def replaced_dtype(value: Any) -> str:
    """The message for the removed ``[local] dtype`` option, naming what replaces ``value``."""
    new = REPLACED_DTYPES.get(value, "'fp32', 'bf16-mixed', 'bf16-true' or 'fp16-mixed'")
    return f"[local] dtype was replaced by precision: dtype = {value!r} -> precision = {new}"


def keep_masters(params: Sequence[torch.nn.Parameter], dtype: torch.dtype) -> None:
    """Store the trainable parameters in ``dtype`` (peft may build an adapter in its base's dtype)."""
    for param in params:
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


def make_optimizer(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                   eps: float, weight_decay: float, precision: Precision) -> torch.optim.Optimizer:
    """AdamW over ``params``: torch's (fused where it can be), or Kahan-compensated for bf16-true."""
    from preftune.backend_utils import adamw

    if precision.compensated:
        return KahanAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return adamw(params, lr, betas, eps, weight_decay)


def make_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision.scaled else None


class KahanAdamW(torch.optim.Optimizer):
    """AdamW for low-precision weights: the update is computed in float32 and added with Kahan
    summation, so what rounding drops is kept in a per-parameter compensation buffer (the weight's
    dtype) and applied once it adds up. Moments and compensation are stored in the weight's dtype.
    Honours ``found_inf`` (as ``torch.amp.GradScaler`` sets it): the step changes nothing where it
    is 1, decided on the device."""

    _step_supports_amp_scaling = True

    def __init__(self, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group, found_inf)

    def _update(self, param: Tensor, group: dict[str, Any], found_inf: Tensor | None) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            for key in ("exp_avg", "exp_avg_sq", "compensation"):
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        ok = (torch.ones((), device=param.device) if found_inf is None
              else 1.0 - found_inf.to(param.device, torch.float32))
        state["step"].add_(ok)
        beta1, beta2 = group["betas"]
        step = state["step"].clamp(min=1.0)
        scale = (1 - beta2 ** step).sqrt()
        size = group["lr"] / (1 - beta1 ** step)
        tensors = [local(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"],
                                      state["compensation"])]  # FSDP: this rank's shards, in place
        for views in zip(*(t.view(-1).split(KAHAN_CHUNK) for t in tensors)):
            kahan_adamw(*views, group, ok.bool(), size, scale)


def local(tensor: Tensor) -> Tensor:
    """A sharded (DTensor) parameter's or state's local shard, which aliases it; else itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def kahan_adamw(p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor, group: dict[str, Any],
                ok: Tensor, size: Tensor, scale: Tensor) -> None:
    """One AdamW update of a (flat slice of a) low-precision parameter, in place, where ``ok``."""
    beta1, beta2 = group["betas"]
    g32, p32 = g.float(), p.float()
    m32 = m.float().lerp_(g32, 1 - beta1)
    v32 = v.float().mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
    update = (m32 / (v32.sqrt() / scale + group["eps"])).mul_(-size)
    update.sub_(p32, alpha=group["lr"] * group["weight_decay"]).add_(c.float())
    new = (p32 + update).to(p.dtype)
    compensation = update.sub_(new.float() - p32)  # what rounding dropped, kept for the next step
    for target, value in ((p, new), (m, m32), (v, v32), (c, compensation)):
        target.copy_(torch.where(ok, value.to(target.dtype), target))


class Stepper:
    """The backward pass's loss scaling and the optimizer step, with no host sync."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, sharded: bool = False):
        self.params, self.optimizer, self.scaler = params, optimizer, scaler
        self.sharded = sharded  # FSDP: each rank holds a shard of every gradient
        device = params[0].device if params else torch.device("cpu")
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, adam: AdamParams) -> dict[str, Tensor]:
        """Apply the accumulated gradient (clipped when ``max_grad_norm`` > 0) unless its norm is
        not finite; clear it. Returns device tensors (no host sync): ``grad_norm``, and under
        fp16-mixed ``step_skipped`` (the loss scaler found an overflow)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = grad_norm(self.params, adam.max_grad_norm)
        bad = ~torch.isfinite(norm)
        if self.scaler is not None and self.sharded:
            agree_overflow(self.scaler, self.optimizer, bad)
        for group in self.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        metrics = {"grad_norm": norm}
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # fused AdamW reads the scaler's found_inf: no sync
            self.scaler.update()
            self.skipped += bad
            metrics["step_skipped"] = bad
        else:
            guarded_step(self.optimizer, bad)
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped} if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
            self.skipped.copy_(state["skipped"])


def agree_overflow(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, bad: Tensor) -> None:
    """Under FSDP the loss scaler found overflows in this rank's shards only; ``bad`` (from the
    norm of every rank's shards) is the same on every rank, so all skip the step, or none, and
    their loss scales stay equal (what FSDP1's ShardedGradScaler does with an all-reduce)."""
    for found in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
        found.copy_(bad.to(found.device, found.dtype))


def grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> Tensor:
    """The gradients' total L2 norm (a device tensor), after which they are clipped to
    ``max_norm`` when it is > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).float()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    full = getattr(norm, "full_tensor", None)  # FSDP: the norm of the shards, over every rank
    return full() if callable(full) else norm


def guarded_step(optimizer: torch.optim.Optimizer, bad: Tensor) -> None:
    """``optimizer.step()`` unless ``bad``: decided on the device by an optimizer that takes
    ``found_inf`` (torch's fused AdamW, :class:`KahanAdamW`), else after a host sync."""
    if not supports_found_inf(optimizer):
        if not bool(bad):  # host sync: an optimizer without found_inf must not see the step
            optimizer.step()
        return
    optimizer.found_inf, optimizer.grad_scale = bad.float(), None  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    if isinstance(optimizer, KahanAdamW):
        return True
    return any(group.get("fused") for group in optimizer.param_groups)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite: one fused reduction per dtype (the largest
    magnitude, which a NaN or infinity makes non-finite and finite values cannot overflow) and
    one host sync."""
    if not tensors:
        return True
    peaks = torch._foreach_norm(list(tensors), float("inf"))
    return bool(torch.isfinite(torch.stack([p.float() for p in peaks])).all())  # host sync


def first_bad(named: Iterator[tuple[str, Tensor]]) -> str | None:
    """The name of the first tensor that holds a NaN or an infinity."""
    return next((name for name, t in named if not torch.isfinite(t).all()), None)
