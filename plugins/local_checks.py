"""Settings the ``local`` backend cannot use, refused before anything loads.

:func:`check_settings` is ``LocalBackend.check``: the run calls it before it creates the log
directory or loads a tokenizer or weights. It reads only the model's config (its structure and
context length); LoRA target modules are matched against the model built on the meta device,
which holds no weights, by peft itself, so the check agrees with what training would do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from preftune import Config, ConfigError, log
from preftune.backend_utils import load_model_config, model_context, resolve_init
from preftune.plugins.local_attention import attention_problem, layout_problem
from preftune.plugins.local_precision import precision_problem, resolve_precision
from preftune.world import world_env

DEVICE_KINDS = {  # device type -> whether this machine has it
    "cpu": lambda: True,
    "cuda": torch.cuda.is_available,
    "mps": lambda: torch.backends.mps.is_available(),
}
DEVICES = "auto, cpu, cuda, cuda:N, mps"
T = TypeVar("T")


def field_error(config: Config, key: str, message: str) -> ConfigError:
    """An error naming ``key``, and the --set that gave it if one did."""
    origin = config.origin(key)
    return ConfigError((f"{origin}: " if origin else "") + f"field {key!r}: {message}")


def check_settings(config: Config, options: Any) -> None:
    """Refuse what the run could not use: the device, a precision it lacks (bfloat16 on an old
    GPU), LoRA options without LoRA, a model path that does not exist, a ``max_seq_len`` beyond
    the model's context, an attention implementation the model or this machine lacks, LoRA
    target modules that match nothing."""
    problem = device_problem(config.device)
    if problem is not None:
        raise field_error(config, "device", problem)
    problem = precision_problem(options.precision, resolve_device(config.device))
    if problem is not None:
        raise field_error(config, "local.precision", problem)
    check_lora_options(config, options)
    check_parallel_options(config, options)
    name, structure, adapter = model_structure(config)
    check_context(config, name, structure)
    check_attention(config, options, structure)
    if config.lora_rank > 0 and not adapter:
        check_lora_targets(config, name, structure, options.lora_target_modules)
        note_lora_rank(config, structure)


def check_parallel_options(config: Config, options: Any) -> None:
    """What FSDP cannot do yet, refused before anything starts (under torchrun only)."""
    if world_env()[1] == 1 or options.parallel != "fsdp":
        return
    if options.merge_lora:
        raise field_error(config, "local.merge_lora", "not with parallel = 'fsdp': merge final/ "
                          "afterwards with preftune export --merge")


def note_lora_rank(config: Config, structure: Any) -> None:
    """Say once that a LoRA rank above the model's hidden size buys nothing: a layer's update
    ``B @ A`` has rank at most min(in, out) <= hidden_size, whatever ``lora_rank`` says."""
    text = structure.get_text_config() if hasattr(structure, "get_text_config") else structure
    hidden = getattr(text, "hidden_size", None)
    if isinstance(hidden, int) and config.lora_rank > hidden:
        log(f"lora_rank = {config.lora_rank} is above the model's hidden size ({hidden}): a LoRA "
            f"update has rank at most {hidden}, so the extra rank adds memory and no capacity")


def model_structure(config: Config) -> tuple[str, Any, bool]:
    """The model training starts from, read without weights: its name, its transformers config,
    and whether ``init_from`` is an adapter (loaded onto ``base_model``, keeping its targets)."""
    init = checked(config, "init_from", lambda: resolve_init(config.init_from) if config.init_from else None)
    adapter = init is not None and init[0] == "adapter"
    if init is not None and not adapter:
        return str(init[1]), checked(config, "init_from", lambda: load_model_config(str(init[1]))), False
    structure = checked(config, "base_model",
                        lambda: load_model_config(config.base_model, config.base_model_revision))
    return config.base_model, structure, adapter


def check_attention(config: Config, options: Any, structure: Any) -> None:
    """``attn_implementation`` must be one the model implements and this machine can train with
    (``auto`` always is), and must take the custom mask ``layout = 'shared'`` needs."""
    name = options.attn_implementation
    device = resolve_device(config.device)
    problem = layout_problem(name, options.layout)
    if name != "auto" and problem is None:
        compute = resolve_precision(options.precision, device).compute
        reason = attention_problem(name, structure, device, compute)
        problem = f"{name!r} cannot train here: {reason}" if reason else None
    if problem is not None:
        raise field_error(config, "local.attn_implementation", problem)


LORA_ONLY = {  # [local] option -> why it needs lora_rank > 0
    "lora_dropout": "is dropout on a LoRA adapter's input (a full fine-tune trains without dropout)",
    "merge_lora": "merges a LoRA adapter into its base model (a full fine-tune's final/ already is "
                  "the whole model)",
}


def check_lora_options(config: Config, options: Any) -> None:
    """The LoRA options of ``[local]`` are refused, naming them, on a run without LoRA."""
    if config.lora_rank > 0 or options is None:
        return
    for key, why in LORA_ONLY.items():
        value = getattr(options, key)
        if value:
            raise field_error(config, f"local.{key}", f"{value!r} {why}, but lora_rank is 0; "
                              "set lora_rank > 0 or leave it out")


def checked(config: Config, key: str, read: Callable[[], T]) -> T:
    """``read()``, a ConfigError it raises naming ``key`` (and the --set that gave it)."""
    try:
        return read()
    except ConfigError as exc:
        raise field_error(config, key, str(exc)) from None


def resolve_device(name: str) -> torch.device:
    """The torch device ``device`` names (``auto``: CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(f"field 'device': {problem}")
    return torch.device(name)


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device this machine can train on: not a device name at all (saying
    what is allowed), or a device it does not have (saying what it has); None when it is fine."""
    if name == "auto":
        return None
    kind, colon, index = name.partition(":")
    if kind not in DEVICE_KINDS or (colon and (kind != "cuda" or not index.isdigit())):
        return f"{name!r} is not a device the local backend can use; allowed: {DEVICES}"
    if not DEVICE_KINDS[kind]():
        return f"{name!r} asked for, but this machine has no {kind.upper()} device; use auto or cpu"
    count = torch.cuda.device_count() if kind == "cuda" else 0
    if colon and int(index) >= count:
        return f"{name!r} asked for, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return None


def rope_scaling(structure: Any) -> str | None:
    """How the model scales RoPE beyond its base context (``rope_scaling``), if it does."""
    text = structure.get_text_config() if hasattr(structure, "get_text_config") else structure
    for attribute in ("rope_scaling", "rope_parameters"):
        value = getattr(text, attribute, None)
        if isinstance(value, dict):
            kind = value.get("rope_type") or value.get("type")
            if kind not in (None, "default") and value.get("factor", 1) != 1:
                return f"{kind}, factor {value['factor']}"
    return None


def check_context(config: Config, name: str, structure: Any) -> None:
    """``max_seq_len`` must fit the model's positions (when its config says how many); the
    default is lowered to the model's context, a value the user set is refused."""
    context = model_context(structure)
    if context is not None and config.max_seq_len > context[1]:
        key, limit = context
        if "max_seq_len" not in config.model_fields_set:  # the default, not the user's choice
            log(f"max_seq_len: the default {config.max_seq_len} is beyond the context of model "
                f"{name!r} ({key} = {limit}); using {limit}")
            config.max_seq_len = limit
            return
        scaling = rope_scaling(structure)
        if scaling:  # a scaled RoPE reaches past max_position_embeddings, by rules of its own
            log(f"max_seq_len: {config.max_seq_len} is beyond {key} = {limit} of model {name!r}, "
                f"which scales its positions ({scaling}); make sure the model takes it")
            return
        raise field_error(config, "max_seq_len", f"{config.max_seq_len} is beyond the context of "
                          f"model {name!r} ({key} = {limit}); allowed: 2 to {limit}")


def check_lora_targets(config: Config, name: str, structure: Any, targets: str | list[str]) -> None:
    """Every LoRA target must match a module of the model that LoRA can wrap, as peft matches
    them (a string is a regex, each entry of a list a name or name suffix). peft alone ignores an
    entry that matches nothing as long as another one matches."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(structure)
        except (ValueError, KeyError) as exc:
            raise field_error(config, "base_model", f"model {name!r} is not a causal language model "
                              f"transformers can build ({str(exc).splitlines()[0]})") from None
        problem = target_problem(model, targets)
        if problem is None:
            try:  # whatever else peft refuses
                get_peft_model(model, LoraConfig(r=1, target_modules=targets, task_type="CAUSAL_LM"))
            except ValueError as exc:
                problem = str(exc).splitlines()[0]
    if problem is not None:
        raise field_error(config, "local.lora_target_modules", (
            f"{problem}; the layers of model {name!r} LoRA can target: {', '.join(targetable(model))} "
            "(or 'all-linear'; a string is a regex matched against whole module names)"))


def target_problem(model: Any, targets: str | list[str]) -> str | None:
    """Which target matches no module, or a module LoRA cannot wrap (a whole decoder layer)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    entries, kinds = [targets] if isinstance(targets, str) else list(targets), lora_layers()
    for entry in entries:
        if entry == "all-linear":
            continue
        config = LoraConfig(target_modules=entry if isinstance(targets, str) else [entry])
        matched = [(n, m) for n, m in model.named_modules() if n and check_target_module_exists(config, n)]
        if not matched:
            return f"{entry!r} matches no module"
        wrong = next(((n, m) for n, m in matched if not isinstance(m, kinds)), None)
        if wrong is not None:
            return f"{entry!r} matches {wrong[0]!r}, a {type(wrong[1]).__name__}, which LoRA cannot wrap"
    return None


def lora_layers() -> tuple[type, ...]:
    """The layer types peft's LoRA wraps (transformers' Conv1D is GPT-2's linear layer)."""
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)


def targetable(model: Any) -> list[str]:
    """The short names of the layers LoRA can wrap (linear, embedding, convolution)."""
    kinds = lora_layers()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, kinds)})
