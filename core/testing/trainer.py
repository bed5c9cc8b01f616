"""What the emulator computes: one model per training session, on datums, in plain torch.

A datum is what both SDKs send: the input tokens, the target token at each position and a weight
per position. The model is loaded the way preftune's ``local`` backend loads it (same names, same
seeded LoRA initialisation), so a run through the emulator and a local run start from the same
weights. Each datum is computed on its own, with no packing, which makes this an independent check
of the local backend's shared-prompt layout as well.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backend_utils import adamw
from ..weights import load_causal_lm


@dataclass
class Datum:
    tokens: list[int]
    targets: list[int]
    weights: list[float]


@dataclass
class Adam:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class Trainer:
    """A model on the emulated service: the base model, optionally with a LoRA adapter."""

    base_model: str
    lora_rank: int = 0
    lora_alpha: float = 32.0
    seed: int = 0
    forward_only: bool = False
    train_unembed: bool = True
    model: Any = field(init=False, repr=False)
    optimizer: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        model = load_causal_lm(self.base_model, None, torch.float32)
        if self.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            targets: str | list[str] = "all-linear"  # peft's: every linear layer but the output one
            if self.train_unembed:
                targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                  if isinstance(module, torch.nn.Linear)})
            torch.manual_seed(self.seed)
            model = get_peft_model(model, LoraConfig(
                r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=targets,
                lora_dropout=0.0, task_type="CAUSAL_LM"))
        self.model = model.eval()
        if self.forward_only:
            self.model.requires_grad_(False)

    def target_modules(self) -> list[str]:
        """The LoRA adapter's target modules (none without one)."""
        config = getattr(self.model, "peft_config", {}).get("default")
        targets = getattr(config, "target_modules", None) or []
        return sorted([targets] if isinstance(targets, str) else targets)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def logprobs(self, datum: Datum, base_only: bool = False) -> torch.Tensor:
        """Log-probability of each target token ([T], float32)."""
        tokens = torch.tensor([datum.tokens])
        if base_only and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                logits = self.model(input_ids=tokens).logits[0].float()
        else:
            logits = self.model(input_ids=tokens).logits[0].float()
        targets = torch.tensor(datum.targets).unsqueeze(-1)
        return torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1)

    def forward(self, datums: list[Datum], base_only: bool = False) -> list[list[float]]:
        with torch.inference_mode():
            return [self.logprobs(d, base_only).tolist() for d in datums]

    def forward_backward(self, datums: list[Datum]) -> tuple[list[list[float]], float]:
        """Cross-entropy weighted per position, ``L = -sum(weights * logprobs)``, accumulated into
        the gradients; returns the log-probs and ``L``."""
        if self.forward_only:
            raise PermissionError("this trainer is forward-only")
        outputs, total = [], 0.0
        for datum in datums:
            logprobs = self.logprobs(datum)
            loss = -(torch.tensor(datum.weights) * logprobs).sum()
            loss.backward()
            outputs.append(logprobs.detach().tolist())
            total += loss.item()
        return outputs, total

    def optim_step(self, adam: Adam) -> dict[str, float]:
        if self.optimizer is None:
            self.optimizer = _adamw(self.params, adam)
        max_norm = adam.grad_clip_norm if adam.grad_clip_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not torch.isfinite(torch.tensor(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise ArithmeticError(f"gradient norm is {norm}; the step was not applied")
        for group in self.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def save(self, directory: Path, optimizer: bool = True) -> None:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
                   tmp / "weights.pt")
        if optimizer and self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)

    def load(self, directory: Path, optimizer: bool, adam: Adam | None = None) -> None:
        weights = torch.load(directory / "weights.pt", weights_only=True)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        if optimizer and (directory / "optimizer.pt").exists():
            self.optimizer = _adamw(self.params, adam or Adam())
            self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))


def _adamw(params: list[torch.nn.Parameter], adam: Adam) -> torch.optim.Optimizer:
    return adamw(params, adam.learning_rate, (adam.beta1, adam.beta2), adam.eps, adam.weight_decay)


@dataclass
class Generation:
    """One completion: its tokens, each token's log-prob under the model, and why it ended
    (``"stop"``: a stop token, included; ``"length"``: ``max_tokens`` reached)."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


def generate(model: Any, prompt: list[int], max_tokens: int, stop: set[int], temperature: float = 0.0,
             generator: torch.Generator | None = None) -> Generation:
    """Up to ``max_tokens`` new tokens after ``prompt``, one at a time with the KV cache: the
    most likely token at ``temperature`` 0 (greedy), else a draw from the softmax of the logits
    over ``temperature``. Written out rather than ``model.generate``, so that tests can hold the
    emulator to transformers' own generation."""
    tokens: list[int] = []
    logprobs: list[float] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for step in range(max_tokens):
            if step:  # the last token in, on the cache of everything before it
                out = model(input_ids=torch.tensor([tokens[-1:]]), use_cache=True, **_cache_of(out))
            logps = torch.log_softmax(out.logits[0, -1].float(), -1)
            token = _pick(logps, temperature, generator)
            tokens.append(token)
            logprobs.append(float(logps[token]))
            if token in stop:
                return Generation(tokens, logprobs, "stop")
    return Generation(tokens, logprobs, "length")


def _cache_of(out: Any) -> dict[str, Any]:
    """The KV cache of a forward's output, as the next forward takes it: ``cache`` since
    transformers 5.25 (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    key = "cache" if "cache" in out else "past_key_values"
    return {key: out[key]}


def _pick(logps: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logps.argmax())
    probs = torch.softmax(logps / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
