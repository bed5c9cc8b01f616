"""TRL's ``DPOTrainer`` on the benchmark's data, with its fastest fair CPU settings.

The data is TRL's conversational layout (prompt/chosen/rejected message lists), so TRL applies the
chat template itself. Settings, read from TRL 1.16's source (``trl/trainer/dpo_config.py``,
``dpo_trainer.py``, ``base_config.py``):

- ``precompute_ref_log_probs=True``: the reference pass runs once, with the policy itself (TRL
  keeps no second model for it), in ``DPOTrainer.__init__``; it is timed around
  ``_precompute_ref_logps`` and is part of the process's wall time.
- ``precompute_ref_batch_size``: the same forward-only batch size preftune uses
  (``max(2 * batch, 8)``).
- ``activation_checkpointing=False``: TRL's default (``gradient_checkpointing=True``, which
  transformers 5 reads as ``activation_checkpointing``) recomputes activations in the backward, ~20%
  slower; no other contender does. The run records that the model ended without it.
- ``bf16=False``: TRL defaults to bf16 autocast; this benchmark is float32.
- ``padding_free``: not used. In 1.16 it only warns and falls back to padding.
- ``use_logits_to_keep``: gone in 1.16. TRL always uses its fused LM head, which computes log-probs
  in tiles and only at completion positions, without full logits.
- ``dataloader_num_workers=0``: collation is cheap, and on a few cores a worker competes with the
  compute. In-process collation is also what lets the collator count the training tokens.
- ``optim``: TRL's default for torch >= 2.8, ``adamw_torch_fused`` (fused AdamW has a CPU kernel).
- ``train_sampling_strategy="random"`` (the default). ``group_by_length`` would pad less but would
  train on different batches than the other contenders, which draw random batches too.
- No gradient clipping (``max_grad_norm=0``), constant LR, no warmup, weight decay 0, no eval, no
  checkpoints (``save_strategy="no"``), ``report_to="none"``, ``logging_steps=1`` (every step's
  loss reaches the callback; preftune also logs every step). The final weights are saved, as
  preftune and the plain loop save theirs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch
from benchutil import REPORT, install_report, read_pairs
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference


@dataclass
class CountingCollator(DataCollatorForPreference):
    """TRL's collator; once ``counting`` is on, it adds up the non-padding tokens it collates."""

    counting: bool = False
    tokens: int = 0

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        if self.counting:
            self.tokens += int(out["attention_mask"].sum())
        return out


class TimedDPOTrainer(DPOTrainer):
    """Adds the wall time of TRL's reference pass (train set) to ``REPORT["ref_s"]``."""

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        start = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        REPORT["ref_s"] = REPORT.get("ref_s", 0.0) + time.perf_counter() - start
        return out


class Recorder(TrainerCallback):
    """Step losses and the training time: from ``on_train_begin`` to the last step's end."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.begin = self.end = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def dpo_config(a: argparse.Namespace) -> DPOConfig:
    return DPOConfig(
        output_dir=a.out, use_cpu=True, bf16=False, fp16=False, seed=a.seed,
        model_init_kwargs={"dtype": "float32"},
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, max_steps=a.steps,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, beta=a.beta, loss_type=["sigmoid"], max_length=None,
        precompute_ref_log_probs=True, precompute_ref_batch_size=a.ref_batch,
        activation_checkpointing=a.checkpointing, padding_free=False, dataloader_num_workers=0,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True,
    )


def main(a: argparse.Namespace) -> None:
    if a.threads:  # 0: torch's default
        torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    collator = CountingCollator(pad_token_id=tokenizer.pad_token_id)
    recorder = Recorder()
    trainer = TimedDPOTrainer(model=a.model, args=dpo_config(a), data_collator=collator,
                              train_dataset=Dataset.from_list(read_pairs(a.data)),
                              processing_class=tokenizer, callbacks=[recorder])
    collator.counting = True  # the reference pass is over; count what training collates
    trainer.train()
    REPORT.update(train_s=recorder.end - recorder.begin, tokens=collator.tokens, losses=recorder.losses,
                  activation_checkpointing=bool(getattr(trainer.model, "is_activation_checkpointing", None)))
    trainer.save_model(a.out)


if __name__ == "__main__":
    install_report()
    parser = argparse.ArgumentParser(description="TRL DPOTrainer side of bench/compare_trl.py")
    for name, kind in [("model", str), ("data", str), ("out", str), ("steps", int), ("batch", int),
                       ("ref-batch", int), ("lr", float), ("beta", float), ("threads", int), ("seed", int)]:
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--checkpointing", action="store_true", help="TRL's default activation checkpointing")
    main(parser.parse_args())
