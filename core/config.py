"""The run's configuration: one pydantic model, loaded from TOML or YAML, overridable with --set.

Top-level fields follow the Fireworks cookbook's DPO recipe Config. Options of a plugin live in a
table named after it (``[wandb]``, ``[orpo]``) and are validated by the options model the plugin
registered; any other unknown key is an error that lists the known ones and suggests the closest.
Settings are validated as the data a file holds, strictly (:func:`validate_settings`): ``true`` is
not a batch size. An error names the file, or the ``--set`` argument as given, and the key.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import json
import math
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .config_files import read_config_file
from .errors import ConfigError
from .secrets import MASK, mask_secrets, mask_setting

M = TypeVar("M", bound=BaseModel)


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
    dataset: str | None = Field(
        None, description="Training preference pairs: a JSONL (or .jsonl.gz), JSON or Parquet file, a "
        "directory of Parquet shards or of datasets.save_to_disk, or hf:org/name (from Python, "
        "run(config, dataset=...) also takes a datasets.Dataset).")
    eval_dataset: str | None = Field(
        None, description="Held-out pairs (any form dataset takes); default: split eval_fraction off dataset."
    )
    dataset_split: str = Field("train", description="The split of a hub id or a directory holding several "
                               "(hf:org/name@split overrides it for one data set).")
    dataset_config: str | None = Field(None, description="The configuration (subset) of a hub dataset.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="A record that cannot be read: stop the run (error), or leave it out and "
        "list it in log_path/skipped.jsonl (skip).")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="With on_bad_record = skip: the run "
                                    "stops when more than this share of the records is bad.")
    template_ignores: Literal["error", "allow"] = Field(
        "error", description="A key a record holds that the chat template ignores (tools, a message's "
        "name, tool_call_id): refuse the record (error), or train without it and say so (allow).")
    data_workers: int = Field(0, ge=0, description="Processes that parse and tokenize the data; 0 = one per "
                              "CPU core.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of dataset held out.")
    eval_interval: int = Field(0, ge=0, description="Evaluate every N steps; 0 = at start and end.")
    eval_samples: int = Field(0, ge=0, description="At each evaluation, greedy completions of the first N "
                              "held-out prompts (samples.jsonl, report.html, W&B); 0 = off.")
    eval_sample_tokens: int = Field(128, gt=0, description="The most new tokens of each eval sample.")
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
    seed: int = Field(0, ge=0, le=2**64 - 1,
                      description="Seeds the data split, the data order and initialization (0 to 2**64-1).")
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
    device: str = Field("auto", description="Local backend device: auto, cpu, cuda, cuda:N, mps.")
    # dotted key -> the --set argument that gave it, so errors found later still name it
    _overrides: dict[str, str] = PrivateAttr(default_factory=dict)
    _source_file: str | None = PrivateAttr(default=None)  # the config file it was read from

    @property
    def source_file(self) -> str | None:
        """The config file this config was read from, if any (a run never writes over it)."""
        return self._source_file

    @field_validator("log_path", "cache_dir", "base_model", "base_model_revision", "tokenizer_model",
                     "init_from", "dataset", "eval_dataset")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave the key out for its default)")
        return value

    def origin(self, key: str) -> str | None:
        """The ``--set`` argument that gave ``key`` (or a table holding it), if one did."""
        return set_origin(self._overrides, key)

    def plugin_tables(self) -> dict[str, Any]:
        """The tables of the config that are not fields: plugin options."""
        return dict(self.__pydantic_extra__ or {})

    def options_for(self, name: str, model: type[BaseModel]) -> BaseModel:
        """Validate the ``[name]`` table with ``model`` (an empty table gives the defaults)."""
        table = self.plugin_tables().get(name, {})
        try:
            options = validate_settings(model, table)
        except ValidationError as exc:
            known = [f.alias or n for n, f in model.model_fields.items()]
            problems = _describe(exc, self.origin, prefix=f"{name}.", known=known)
            raise ConfigError(f"{problems} (known [{name}] keys: {', '.join(known)})") from None
        check_finite(options.model_dump(by_alias=True), f"{name}.")
        return options

    def check_plugin_tables(self, registry: Any) -> dict[str, BaseModel]:
        """Validate every plugin table against the registry; unknown keys are errors."""
        validated = {}
        for key, value in self.plugin_tables().items():
            model = registry.options_model(key)
            if model is None:
                raise ConfigError(_unknown_key(key, registry, self.origin(key)))
            if not isinstance(value, dict):
                where = f"{self.origin(key)}: " if self.origin(key) else ""
                raise ConfigError(f"{where}config key {key!r} must be a table of {key} options "
                                  f"(--set {key}.<option>=value sets one)")
            validated[key] = self.options_for(key, model)
        return validated

    def redacted(self, registry: Any | None = None) -> dict[str, Any]:
        """The config as JSON-safe data with secrets masked: pydantic ``SecretStr`` fields, and
        whatever :func:`~preftune.secrets.mask_setting` masks (secret settings, keys, the
        passwords of URLs)."""
        data = self.model_dump(mode="json", exclude=set(self.plugin_tables()))
        if registry is not None:
            for key, options in self.check_plugin_tables(registry).items():
                data[key] = options.model_dump(mode="json", by_alias=True)
        return {key: mask_setting(key, value) for key, value in data.items()}


def check_finite(values: Any, where: str) -> None:
    """Refuse NaN and infinity anywhere in a plugin's options, whatever its options model says
    (a NaN learning rate or weight ends a run that trains nothing useful)."""
    if isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"field {where.rstrip('.')!r}: must be a finite number, got {values}")
    items = values.items() if isinstance(values, dict) else (
        enumerate(values) if isinstance(values, (list, tuple)) else [])
    for key, value in items:
        check_finite(value, f"{where}{key}." if isinstance(values, dict) else f"{where[:-1]}[{key}].")


def validate_settings(model: type[M], data: Any) -> M:
    """``model`` from settings as a file holds them: in pydantic's strict mode on JSON data, so
    ``true``, ``"4"`` and ``2.5`` are not integers and ``5`` is not text, while ``1`` is still a
    float and strings still give enum values and paths. TOML and YAML dates are their ISO text.
    Objects only Python code can pass (a ``Path``, a ``SecretStr``) are validated as Python."""
    try:
        text = json.dumps(data, default=_date_text)
    except (TypeError, ValueError):
        return model.model_validate(data)
    return model.model_validate_json(text, strict=True)


def _date_text(value: Any) -> str:
    if isinstance(value, (datetime.date, datetime.time)):  # a file's date: the text it was written as
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not file data")


def set_origin(overrides: dict[str, str], key: str) -> str | None:
    """The ``--set`` argument in ``overrides`` that gave dotted ``key`` or a table holding it."""
    parts = key.split(".")
    return next((overrides[k] for n in range(len(parts), 0, -1)
                 if (k := ".".join(parts[:n])) in overrides), None)


def _unknown_key(key: str, registry: Any, origin: str | None = None) -> str:
    fields = sorted(Config.model_fields)
    tables = {c.name: c.options for c in registry.all() if c.options is not None}
    options = [f"{t}.{f.alias or n}" for t, model in tables.items() for n, f in model.model_fields.items()]
    message = (f"{origin}: " if origin else "") + f"unknown config key {key!r}"
    in_table = [o for o in options if o.split(".", 1)[1] == key]  # dtype -> local.dtype
    close = in_table or difflib.get_close_matches(key, fields + sorted(tables) + options, n=1)
    if close:
        message += f" (did you mean {_spell(close[0], origin)}?)"
    message += f"; known keys: {', '.join(fields)}"
    if tables:
        message += f"; plugin option tables: {', '.join(sorted(tables))}"
    return message


def _spell(key: str, origin: str | None) -> str:
    """How to write ``key`` where the mistake was made: a ``--set`` or a config file."""
    if origin is not None and origin.startswith("--set "):
        return f"--set {key}={origin.partition('=')[2]}"
    table, _, leaf = key.rpartition(".")
    return f"{leaf!r} in the [{table}] table" if table else repr(key)


def _describe(exc: ValidationError, origin_of: Callable[[str], str | None], prefix: str = "",
              known: Sequence[str] = ()) -> str:
    """One clause per problem: where it was given (the file or the --set), the key, what is wrong."""
    clauses: dict[str | None, list[str]] = {}  # by origin, in order: a file is named once
    for err in exc.errors():
        key = prefix + ".".join(str(p) for p in err["loc"])
        origin = origin_of(key)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f" (did you mean {_spell(prefix + close[0], origin)}?)" if close else ""
            clause = f"unknown key {key!r}{hint}"
        else:
            message = err["msg"].removeprefix("Value error, ")
            clause = f"field {key!r}: {message}{_got(err, key)}{_quote_hint(err, origin)}"
        clauses.setdefault(origin, []).append(clause)
    return mask_secrets("; ".join((f"{origin}: " if origin else "") + "; ".join(items)
                                  for origin, items in clauses.items()))


def _got(err: Any, key: str) -> str:
    """``, got <the value as written>`` for a wrong value (not for a missing one, nor for a
    secret: it is never repeated)."""
    shown = mask_setting(key, err["input"])
    if err["type"] == "missing" or shown == MASK:
        return ""
    text = json.dumps(shown, default=str)
    return f", got {text if len(text) <= 40 else text[:37] + '...'}"


def _quote_hint(err: Any, origin: str | None) -> str:
    """--set reads values as TOML: text that looks like a number or a boolean needs quotes."""
    if (err["type"] != "string_type" or not (origin or "").startswith("--set ")
            or isinstance(err["input"], (dict, list))):
        return ""
    key, _, value = origin.removeprefix("--set ").partition("=")
    return f" (--set reads the value as TOML; for text, quote it: --set '{key}=\"{value}\"')"


def make_config(data: dict[str, Any], source: str = "config", overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from settings as files give them (see :func:`validate_settings`);
    errors name ``source``, or the ``--set`` in ``overrides`` that gave the key."""
    origins = override_origins(overrides)
    try:
        config = validate_settings(Config, data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, lambda key: set_origin(origins, key) or source)) from None
    config._overrides = origins
    return config


def override_origins(overrides: Sequence[str]) -> dict[str, str]:
    """Each ``--set`` argument by the dotted key it sets, as errors quote it (secrets masked)."""
    return {item.partition("=")[0].strip(): f"--set {masked_set(item)}" for item in overrides}


def masked_set(item: str) -> str:
    """A ``--set`` argument as it may be shown: a secret in its value is never repeated (a
    secret setting's value, a key, a URL's password)."""
    key, sep, value = item.partition("=")
    if not sep:
        return mask_secrets(item)
    text = value.strip().strip("'\"")
    shown = mask_setting(key.strip(), text)
    return item if shown == text else f"{key.strip()}={shown}"


def parse_value(text: str) -> Any:
    """Parse a --set value as a TOML value (1e-5, true, [..], "s"); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except ValueError as exc:  # an integer of thousands of digits
        raise ConfigError(f"--set value {text[:40]}...: a number too long to read ({exc})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` / ``table.key=value`` overrides to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {masked_set(item)!r}: expected key=value")
        *tables, leaf = key.strip().split(".")
        target = data
        for table in tables:
            target = target.setdefault(table, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {masked_set(item)!r}: {table!r} is not a table")
        target[leaf] = parse_value(value.strip())
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a config file (or nothing), apply overrides and validate the top-level fields."""
    data = read_config_file(path) if path is not None else {}
    config = make_config(apply_overrides(data, list(overrides)), str(path or "--set"), overrides)
    config._source_file = str(path) if path is not None else None
    return config


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
