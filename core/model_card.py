"""``final/README.md``: a Hugging Face model card for the run's final weights.

YAML front matter as the hub reads it (``base_model``, ``library_name``, ``tags``, ``datasets`` for
data from the hub), then what was trained on what: the data sets with their hashes (or the hub's
fingerprint and revision), the loss and its settings, the schedule, the steps, and the final
held-out metrics, so that ``final/`` can be uploaded as it is. Secrets never reach it: the
settings come from the redacted config.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .manager import preftune_version

SCHEDULE = ("epochs", "batch_size", "grad_accum", "learning_rate", "lr_schedule", "warmup_steps",
            "max_seq_len", "lora_rank", "lora_alpha", "seed")


def model_card(config: dict[str, Any], datasets: Sequence[tuple[str, str, dict[str, str]]],
               steps: int, final_eval: dict[str, float], adapter: bool,
               loss_options: dict[str, Any] | None = None) -> str:
    """The card's text. ``config``: the redacted config; ``datasets``: (setting, value, identity)
    of each data set; ``adapter``: the weights are a PEFT adapter (LoRA); ``loss_options``: the
    loss's options table, defaults included."""
    loss = str(config.get("loss", "dpo"))
    hub = [value.removeprefix("hf:") for _, value, _ in datasets if value.startswith("hf:")]
    front = {"base_model": config.get("base_model"), "library_name": "peft" if adapter else "transformers",
             "tags": ["preftune", loss, "preference-optimization"] + (["lora"] if adapter else []),
             **({"datasets": hub} if hub else {})}
    lines = ["---", *yaml_lines(front), "---", "",
             f"# {config.get('base_model')} trained with {loss} by preftune", "",
             f"Preference-optimized from `{config.get('base_model')}` with preftune "
             f"{preftune_version()} ({'a LoRA adapter' if adapter else 'all weights'}).", "",
             "## Data", "", "| setting | data set | identity |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | `{value}` | {', '.join(f'{k} `{v}`' for k, v in ident.items())} |"
              for key, value, ident in datasets]
    lines += ["", "## Training", "", "| setting | value |", "| --- | --- |",
              f"| `loss` | `{loss}` |", f"| `beta` | `{config.get('beta')}` |"]
    lines += [f"| `{key}` | `{json.dumps(config[key])}` |" for key in SCHEDULE if key in config]
    lines += [f"| `{loss}.{k}` | `{json.dumps(v)}` |" for k, v in (loss_options or {}).items()]
    lines += [f"| steps | {steps} |", "", "## Held-out metrics at the end", ""]
    if final_eval:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {v:.6g} |" for k, v in final_eval.items()]
    else:
        lines += ["No held-out pairs (`eval_fraction` = 0 and no `eval_dataset`)."]
    lines += ["", f"The whole configuration is in the run's `config.json`; preftune {preftune_version()}."]
    return "\n".join(lines) + "\n"


def yaml_lines(data: dict[str, Any]) -> list[str]:
    """Flat YAML of strings and lists of strings (JSON strings are valid YAML scalars)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {json.dumps(str(v))}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(str(value))}")
    return lines
