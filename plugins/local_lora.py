"""LoRA in the ``local`` backend: dropout in training steps only, and the adapter merged into a
plain Hugging Face model (``[local] merge_lora``, ``preftune export --merge``).

**Dropout.** The model stays in eval mode so that the policy and the reference are the same
deterministic function. Only peft's ``lora_dropout`` modules are switched to train mode, and only
for a training step's forward *and* backward: activation checkpointing recomputes the forward in
the backward pass, where the same masks must be drawn again (torch's checkpoint restores the RNG
state for that). Evaluation and the reference pass (adapter disabled) never see dropout.

**Merging.** Each LoRA layer is merged on a float32 copy of itself, one layer at a time, and the
result rounded once to the dtype its base weight is stored in: the policy is never changed (the
loop may go on using it), and the memory needed beyond the model is one layer on the device plus
the merged weights on the CPU.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from preftune import Config, ConfigError
from preftune.backend_utils import load_causal_lm, load_model_config, load_tokenizer, resolve_init

MERGED = "merged"  # final/merged/: the plain model beside the adapter
PEFT_MARKERS = ("lora_", "modules_to_save", "original_module", "token_adapter")  # outside LoRA layers


def lora_layers(model: Any) -> dict[str, Any]:
    """peft's LoRA layers of ``model`` by their name in the base model; {} without peft."""
    if not hasattr(model, "peft_config"):
        return {}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def set_lora_dropout(model: Any, p: float) -> list[torch.nn.Module]:
    """Give every LoRA layer of ``model`` dropout ``p`` on its input (a warm-start adapter's own
    value is replaced: the config says what this run trains with), in eval mode; the adapter
    config records it. Returns the dropout modules, for :func:`lora_dropout_on`."""
    modules = []
    for layer in lora_layers(model).values():
        for adapter in layer.lora_dropout:
            layer.lora_dropout[adapter] = torch.nn.Dropout(p).eval() if p > 0 else torch.nn.Identity()
            modules.append(layer.lora_dropout[adapter])
    for config in getattr(model, "peft_config", {}).values():
        config.lora_dropout = p
    return [m for m in modules if isinstance(m, torch.nn.Dropout)]


@contextmanager
def lora_dropout_on(modules: list[torch.nn.Module]) -> Iterator[None]:
    """LoRA dropout active inside the block (a training step's forward and backward), and off
    again after it, whatever happens."""
    for module in modules:
        module.train()
    try:
        yield
    finally:
        for module in modules:
            module.eval()


def merged_state_dict(model: Any) -> tuple[dict[str, torch.Tensor], bool]:
    """The base model's state dict with the adapter merged in, on the CPU, under the base model's
    own names; and whether a merged weight was tied to another (tied embeddings a LoRA layer
    adapts: the merged model must then hold both, untied)."""
    check_mergeable(model)
    layers = lora_layers(model)
    base_state = model.get_base_model().state_dict()
    merged: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        merged.update({f"{name}.{key}": value for key, value in merge_layer(layer).items()})
    adapted = {id_storage(base_state[f"{name}.base_layer.{key}"])
               for name, layer in layers.items() for key in layer.get_base_layer().state_dict()}
    untie = False
    for key, tensor in base_state.items():
        if not inside(key, layers):
            merged[key] = tensor.detach().to("cpu")
            untie = untie or id_storage(tensor) in adapted
    return merged, untie


def check_mergeable(model: Any) -> None:
    """Refuse, before training, an adapter this module cannot merge: one that holds weights
    outside LoRA layers (peft's ``modules_to_save``, trainable tokens), as a warm start may."""
    layers = lora_layers(model)
    keys = model.get_base_model().state_dict() if layers else {}
    other = next((k for k in keys if not inside(k, layers) and any(m in k for m in PEFT_MARKERS)), None)
    if other is not None:
        raise ConfigError(f"[local] merge_lora: the adapter holds weights outside its LoRA layers "
                          f"({other}), which merge_lora cannot merge")


def merge_layer(layer: Any) -> dict[str, torch.Tensor]:
    """One LoRA layer merged (peft's own merge, on a float32 copy): its base layer's weights on
    the CPU, each in the dtype the base layer stores it in."""
    dtypes = {key: value.dtype for key, value in layer.get_base_layer().state_dict().items()}
    merged = copy.deepcopy(layer).float()
    merged.merge()
    state = merged.get_base_layer().state_dict()
    return {key: value.detach().to("cpu", dtypes[key]) for key, value in state.items()}


def inside(key: str, layers: dict[str, Any]) -> bool:
    """Whether state-dict ``key`` belongs to one of the LoRA ``layers`` (by module name)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))


def id_storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def save_merged(model: Any, tokenizer: Any, out: Path) -> None:
    """Write ``model`` (peft LoRA) with its adapter merged to ``out`` as a plain Hugging Face
    model directory: config, safetensors, generation config, tokenizer and chat template."""
    state, untie = merged_state_dict(model)
    model.get_base_model().save_pretrained(out, state_dict=state)
    if untie:  # the loader would tie the adapted weight to its unadapted twin again
        config = out / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "tie_word_embeddings": False},
                                     indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)


def export_merged(config: Config, final: Path, out: str, dtype: torch.dtype) -> None:
    """``preftune export --merge`` for the local backend: the adapter in ``final`` (a finished
    run's ``final/``) merged into the model it was trained on, written to ``out``."""
    from peft import PeftModel

    if not (final / "adapter_config.json").is_file():
        raise ConfigError(f"{final} holds no LoRA adapter (adapter_config.json): the run was a full "
                          "fine-tune, and final/ already is a plain Hugging Face model directory")
    name, revision = base_of(config)
    try:
        load_model_config(name, revision)  # one clear line when the model is gone
    except ConfigError as exc:
        raise ConfigError(f"the run's base model: {exc}") from None
    model = PeftModel.from_pretrained(load_causal_lm(name, revision, dtype), str(final))
    save_merged(model, load_tokenizer(str(final)), Path(out))


def base_of(config: Config) -> tuple[str, str | None]:
    """The model a run's adapter was trained on: ``init_from`` when that is a whole model, else
    ``base_model`` (an ``init_from`` adapter was trained further on ``base_model``)."""
    if config.init_from:
        try:
            kind, directory = resolve_init(config.init_from)
        except ConfigError as exc:
            raise ConfigError(f"the run's init_from: {exc}") from None
        if kind == "model":
            return str(directory), None
    return config.base_model, config.base_model_revision
