"""The run's configuration: one pydantic model, loaded from TOML or YAML, overridable with --set.

Top-level fields follow the Fireworks cookbook's DPO recipe Config. Options of a plugin live in a
table named after it (``[wandb]``, ``[orpo]``) and are validated by the options model the plugin
registered; any other unknown key is an error that lists the known ones.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError


class Config(BaseModel):
    """Everything a run needs. Unknown keys must be option tables of installed plugins."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    # where things go
    log_path: str = Field("./preftune_logs", description="Directory for metrics, config and weights.")
    cache_dir: str | None = Field(
        None, description="Caches of tokenized data and reference log-probs; default $PREFTUNE_CACHE_DIR or "
        "~/.cache/preftune."
    )
    # model and data
    base_model: str = Field(description="Hugging Face model id, local path, or builtin:tiny.")
    base_model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer_model: str | None = Field(None, description="Tokenizer id or path; default base_model.")
    init_from: str | None = Field(
        None, description="Start from these weights: a checkpoint, HF model or PEFT adapter dir."
    )
    dataset: str = Field(description="Training preference pairs, a JSONL file (plain or gzip).")
    eval_dataset: str | None = Field(
        None, description="Held-out pairs (JSONL, plain or gzip); default: split eval_fraction off dataset."
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of dataset held out.")
    eval_interval: int = Field(0, ge=0, description="Evaluate every N steps; 0 = at start and end.")
    max_pairs: int | None = Field(
        None, gt=0, description="Read at most this many pairs of dataset (before the held-out split)."
    )
    max_seq_len: int = Field(4096, gt=1, description="Longest sequence (prompt + completion).")
    # the objective
    beta: float = Field(0.1, gt=0, description="DPO temperature: loss = -logsigmoid(beta * margin).")
    # optimization
    epochs: int = Field(1, gt=0, description="Passes over the training pairs.")
    batch_size: int = Field(4, gt=0, description="Pairs per forward/backward (micro-batch).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak Adam learning rate.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Decay after warmup: constant, linear or cosine (to 0)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 over N optimizer steps.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(0.0, ge=0, description="Clip the gradient norm; 0 = no clipping.")
    lora_rank: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tune.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    seed: int = Field(0, description="Seeds the data split, the data order and initialization.")
    # checkpoints
    checkpoint_interval: int = Field(0, ge=0, description="Checkpoint every N steps; 0 = off.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    resume: bool = Field(False, description="Continue from the newest checkpoint in log_path.")
    # which plugins make up the run
    format: str = Field("auto", description="Dataset format; auto picks by each record's keys.")
    loss: str = Field("dpo", description="Loss plugin.")
    reference: str = Field(
        "auto",
        description="Reference provider; auto = separate (full) / lora_shared (LoRA) / none.",
    )
    backend: str = Field("local", description="Backend plugin (where training runs).")
    sinks: list[str] = Field(["console", "jsonl"], description="Sink plugins (metrics, weights).")
    device: str = Field("auto", description="Local backend device: auto, cpu, cuda, cuda:N.")

    def plugin_tables(self) -> dict[str, Any]:
        """The tables of the config that are not fields: plugin options."""
        return dict(self.__pydantic_extra__ or {})

    def options_for(self, name: str, model: type[BaseModel]) -> BaseModel:
        """Validate the ``[name]`` table with ``model`` (an empty table gives the defaults)."""
        table = self.plugin_tables().get(name, {})
        try:
            options = model.model_validate(table)
        except ValidationError as exc:
            known = ", ".join(f.alias or n for n, f in model.model_fields.items())
            raise ConfigError(f"{_describe(exc, prefix=f'{name}.')} (known [{name}] keys: {known})") from None
        check_finite(options.model_dump(by_alias=True), f"{name}.")
        return options

    def check_plugin_tables(self, registry: Any) -> dict[str, BaseModel]:
        """Validate every plugin table against the registry; unknown keys are errors."""
        validated = {}
        for key, value in self.plugin_tables().items():
            model = registry.options_model(key)
            if model is None:
                raise ConfigError(_unknown_key(key, registry))
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be a table of {key} options")
            validated[key] = self.options_for(key, model)
        return validated

    def redacted(self, registry: Any | None = None) -> dict[str, Any]:
        """The config as JSON-safe data with secrets (pydantic SecretStr fields) masked."""
        data = self.model_dump(mode="json", exclude=set(self.plugin_tables()))
        if registry is not None:
            for key, options in self.check_plugin_tables(registry).items():
                data[key] = options.model_dump(mode="json", by_alias=True)
        return data


def check_finite(values: Any, where: str) -> None:
    """Refuse NaN and infinity anywhere in a plugin's options, whatever its options model says
    (a NaN learning rate or weight ends a run that trains nothing useful)."""
    if isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"field {where.rstrip('.')!r}: must be a finite number, got {values}")
    items = values.items() if isinstance(values, dict) else (
        enumerate(values) if isinstance(values, (list, tuple)) else [])
    for key, value in items:
        check_finite(value, f"{where}{key}." if isinstance(values, dict) else f"{where[:-1]}[{key}].")


def _unknown_key(key: str, registry: Any) -> str:
    fields = sorted(Config.model_fields)
    tables = sorted(
        c.name for c in registry.all() if c.options is not None
    )
    message = f"unknown config key {key!r}"
    close = difflib.get_close_matches(key, fields + tables, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    message += f"; known keys: {', '.join(fields)}"
    if tables:
        message += f"; plugin option tables: {', '.join(tables)}"
    return message


def _describe(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        where = prefix + ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {where!r}")
        else:
            lines.append(f"field {where!r}: {err['msg']}")
    return "; ".join(lines)


def make_config(data: dict[str, Any], source: str = "config") -> Config:
    """Build a :class:`Config`, turning validation errors into a :class:`ConfigError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (.toml) or YAML (.yaml/.yml) file into a dict. No code is executed."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: config files must end in .toml, .yaml, .yml or .json")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of settings")
    return data


def parse_value(text: str) -> Any:
    """Parse a --set value as a TOML value (1e-5, true, [..], "s"); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` / ``table.key=value`` overrides to a copy of ``data``."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        *tables, leaf = key.strip().split(".")
        target = data
        for table in tables:
            target = target.setdefault(table, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {table!r} is not a table")
        target[leaf] = parse_value(value.strip())
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a config file (or nothing), apply overrides and validate the top-level fields."""
    data = read_config_file(path) if path is not None else {}
    return make_config(apply_overrides(data, list(overrides)), source=str(path or "--set"))


def config_fields() -> dict[str, tuple[str, Any, str]]:
    """Every top-level field: name -> (type, default, description), for the docs."""
    out = {}
    for name, info in Config.model_fields.items():
        default = "required" if info.is_required() else info.default
        out[name] = (_type_name(info.annotation), default, info.description or "")
    return out


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not hasattr(annotation, "__args__") else None
    return (text or str(annotation).replace("typing.", "")).replace(" | ", " or ")
