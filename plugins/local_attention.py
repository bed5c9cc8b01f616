"""Which attention implementation the ``local`` backend asks transformers for (``[local]
attn_implementation``), and why one cannot run here.

An implementation runs when the model's class implements it (transformers' ``_supports_*``
flags) and this machine can run it: ``flash_attention_2`` needs the ``flash_attn`` package, a
CUDA device and a float16 / bfloat16 forward; ``flex_attention`` needs torch's FlexAttention
with a backward pass on the device (torch 2.13 has none on the CPU). ``auto`` takes the first
that runs in the order that fits the layout: ``sdpa`` (then ``eager``) where the prompt may be
shared, since both take the custom 4D mask that layout needs; ``flash_attention_2`` first when
the layout is ``padded``, the rows it is made for. ``flex_attention`` is only used when asked for:
its trade-off against ``sdpa`` on a GPU is not measured yet.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
SUPPORT_FLAGS = {  # implementation -> the model class attribute that says it implements it
    "sdpa": "_supports_sdpa",
    "flash_attention_2": "_supports_flash_attn",
    "flex_attention": "_supports_flex_attn",
}
AUTO_ORDER = {  # layout -> what auto tries, in order
    "auto": ("sdpa", "eager"),
    "shared": ("sdpa", "eager"),
    "padded": ("flash_attention_2", "sdpa", "eager"),
}
NO_4D_MASK = ("flash_attention_2",)  # take no custom 4D mask: never the shared layout


def pick_attention(requested: str, layout: str, runs: Iterable[str]) -> str:
    """The implementation to load: ``requested``, or for ``auto`` the first of the layout's
    order among those that ``runs`` (eager, which every model has, when none does)."""
    if requested != "auto":
        return requested
    usable = set(runs)
    return next((name for name in AUTO_ORDER[layout] if name in usable), "eager")


def machine_problem(name: str, device: torch.device, compute: torch.dtype) -> str | None:
    """Why this machine cannot train with ``name`` on ``device`` with a ``compute``-dtype forward."""
    check = MACHINE_CHECKS.get(name)
    return check(device, compute) if check is not None else None


def flash_problem(device: torch.device, compute: torch.dtype) -> str | None:
    """flash_attention_2 needs CUDA, the ``flash_attn`` package (transformers would otherwise fetch
    a kernel from the Hub) and a float16 / bfloat16 forward."""
    if device.type != "cuda":
        return f"it runs on a CUDA device only (device is {device.type})"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed (pip install flash-attn)"
    if compute not in (torch.float16, torch.bfloat16):
        return ("it computes in float16 or bfloat16 only, and this precision's forward is "
                f"{str(compute).removeprefix('torch.')}: set local.precision to bf16-mixed or fp16-mixed")
    return None


def flex_problem(device: torch.device, compute: torch.dtype) -> str | None:
    """flex_attention needs torch's FlexAttention, with a backward pass on the device."""
    from transformers.utils import is_torch_flex_attn_available

    if not is_torch_flex_attn_available():
        return f"torch {torch.__version__} has no FlexAttention"
    if device.type == "cpu" and not flex_backward_on_cpu():
        return (f"torch {torch.__version__}'s FlexAttention has no backward pass on the CPU, and "
                "training needs one; use sdpa or eager, or a CUDA device")
    return None


def flex_backward_on_cpu() -> bool:
    """Whether FlexAttention takes inputs that need gradients on the CPU (torch refuses them at
    once, before computing anything, where it has no CPU backward)."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros((1, 1, 16, 16), requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            flex_attention(q, q, q)
    except NotImplementedError:
        return False
    return True


MACHINE_CHECKS: dict[str, Callable[[torch.device, torch.dtype], str | None]] = {
    "flash_attention_2": flash_problem,
    "flex_attention": flex_problem,
}


def model_class(structure: Any) -> type | None:
    """The causal-LM class transformers builds for a model config, or None when it has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(structure)]
    except KeyError:
        return None


def class_problem(name: str, cls: type | None) -> str | None:
    """Why the model class does not implement ``name`` (eager it always does)."""
    flag = SUPPORT_FLAGS.get(name)
    if flag is None or cls is None or getattr(cls, flag, False):
        return None
    return f"model class {cls.__name__} does not implement it"


def attention_problem(name: str, structure: Any, device: torch.device, compute: torch.dtype) -> str | None:
    """Why ``name`` cannot train this model here, or None."""
    return class_problem(name, model_class(structure)) or machine_problem(name, device, compute)


def runnable(structure: Any, device: torch.device, compute: torch.dtype) -> list[str]:
    """The implementations that can train this model here."""
    return [name for name in IMPLEMENTATIONS if attention_problem(name, structure, device, compute) is None]


def layout_problem(name: str, layout: str) -> str | None:
    """Why ``layout`` cannot be used with ``name`` (the shared prompt needs a custom 4D mask)."""
    if layout == "shared" and name in NO_4D_MASK:
        return (f"{name!r} takes no custom 4D attention mask, which layout = 'shared' needs; use "
                "layout = 'auto' or 'padded' (the prompt computed twice), or sdpa, eager or flex_attention")
    return None
