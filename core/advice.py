"""Settings that the run accepts but that would void what the user asked for, said once.

None of these is an error: each is a setting the selected plugins ignore, or one whose effect is
not what its name promises in this run (a warmup longer than the run). The run says each once,
before anything loads where the config alone tells, else once the data is known.
"""

from __future__ import annotations

from typing import Any

from .config import Config


def ignored_settings(config: Config, loss: Any) -> list[str]:
    """Settings the selected plugins do not use (from the config alone)."""
    given = config.model_fields_set
    notes = []
    if "reference" in given and config.reference not in ("auto", "none") and not loss.needs_reference:
        notes.append(f"reference = {config.reference!r} is ignored: loss {config.loss!r} needs no "
                     "reference model")
    if "lora_alpha" in given and config.lora_rank == 0:
        notes.append("lora_alpha is ignored: lora_rank = 0 asks for a full fine-tune")
    if "keep_checkpoints" in given and config.checkpoint_interval == 0:
        notes.append("keep_checkpoints is ignored: checkpoint_interval = 0 writes no checkpoints")
    # a loss made of others (``combined``) names them in ``parts``: their tables are read too
    selected = {config.loss, *getattr(loss, "parts", ()), config.format, config.reference,
                config.backend, *config.sinks}
    for table in config.plugin_tables():
        if table not in selected:
            notes.append(f"[{table}] is ignored: no selected plugin is named {table!r} (loss "
                         f"{config.loss!r}, backend {config.backend!r}, sinks {config.sinks})")
    return notes


def schedule_notes(config: Config, total_steps: int, eval_pairs: int) -> list[str]:
    """What the data makes of the schedule and the evaluation settings."""
    notes = []
    if config.warmup_steps >= total_steps > 0:
        peak = config.learning_rate * total_steps / config.warmup_steps
        notes.append(f"warmup_steps = {config.warmup_steps} is not below the run's {total_steps} "
                     f"optimizer steps: the learning rate peaks at {peak:.3g} at the last step, not "
                     f"at learning_rate = {config.learning_rate:g}; lower warmup_steps to reach it")
    if eval_pairs == 0 and config.eval_interval > 0:
        notes.append(f"eval_interval = {config.eval_interval} is ignored: there are no held-out pairs")
    return notes


def no_held_out(config: Config, pairs: int, moved: int) -> str | None:
    """Why ``eval_fraction`` > 0 held out no pair (the docs promise at least one), or None."""
    if config.eval_fraction <= 0 or config.eval_dataset:
        return None
    why = ("one pair cannot be split into training and held-out pairs" if pairs < 2 else
           f"its {moved} held-out pair(s) repeat training pairs, so they are trained on")
    return (f"eval_fraction = {config.eval_fraction} holds out no pair of {config.dataset}: {why}; "
            "the run has no held-out evaluation (set eval_dataset for one)")
