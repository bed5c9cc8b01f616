"""The ``local`` backend: torch + transformers (+ peft for LoRA) in this process, CPU or CUDA.

It exposes the verbs of the training SDKs' clients (forward, forward_backward with a custom loss,
optim_step with Adam params, save/load state, save weights), so remote backends slot in beside it.
Dropout is disabled (the model stays in eval mode) so policy and reference log-probs agree.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from preftune import (
    AdamParams,
    Batch,
    Config,
    ConfigError,
    LossFn,
    Metrics,
    PairLogps,
    TrainingError,
    atomic_dir,
    files_hash,
    hookimpl,
    load_causal_lm,
    model_identity,
    resolve_init,
    switch_symlink,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LocalOptions(BaseModel):
    """Options of the ``[local]`` table."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype (log-probs are always computed in float32)."
    )
    lora_target_modules: str | list[str] = Field(
        "all-linear", description="peft target_modules for LoRA."
    )


def sequence_logps(model: Any, batch: Batch) -> torch.Tensor:
    """``[2B, T]`` log-probs of each target token (0 on padding)."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    logps = -F.cross_entropy(logits.float().transpose(1, 2), batch.targets, reduction="none")
    return logps * batch.attention_mask


class FrozenClient:
    """Forward-only log-probs of a model, optionally with its LoRA adapter disabled."""

    def __init__(self, model: Any, device: torch.device, disable_adapter: bool = False):
        self.model, self.device, self.disable_adapter = model, device, disable_adapter

    @torch.no_grad()
    def forward(self, batch: Batch) -> PairLogps:
        batch = batch.to(self.device)
        if self.disable_adapter:
            with self.model.disable_adapter():
                return PairLogps.from_rows(sequence_logps(self.model, batch))
        return PairLogps.from_rows(sequence_logps(self.model, batch))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


class LocalBackend:
    """The policy in this process; see the module docstring."""

    def __init__(self, config: Config, options: LocalOptions, tokenizer: Any):
        self.config, self.options, self.tokenizer = config, options, tokenizer
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[options.dtype]
        self.init = resolve_init(config.init_from) if config.init_from else None
        model = self._initial_model(trainable_adapter=config.lora_rank > 0)
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ConfigError(
                f"tokenizer {config.tokenizer_model or config.base_model!r} has {len(tokenizer)} "
                f"tokens but model {config.base_model!r} only {vocab} embeddings"
            )
        self._identity = model_identity(config.base_model, config.base_model_revision,
                                        None if self.init else model)
        self._identity["dtype"] = options.dtype  # reference log-probs depend on it
        if self.init:
            self._identity.update(init_from=str(self.init[1]), init_sha256=files_hash(self.init[1]))
        if config.lora_rank > 0 and not hasattr(model, "disable_adapter"):
            model = self._add_lora(model)
        self.model = model.to(self.device).eval()  # eval: no dropout; gradients still flow
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, betas=(config.beta1, config.beta2),
            eps=config.eps, weight_decay=config.weight_decay,
        )

    def _initial_model(self, trainable_adapter: bool) -> Any:
        """The weights training starts from: ``init_from`` if set, else the base model. A warm
        start adapter stays a trainable adapter for LoRA, and is merged otherwise."""
        cfg = self.config
        if self.init is not None and self.init[0] == "model":
            return load_causal_lm(str(self.init[1]), None, self.dtype)
        base = load_causal_lm(cfg.base_model, cfg.base_model_revision, self.dtype)
        if self.init is None:
            return base
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(self.init[1]), is_trainable=trainable_adapter)
        return model if trainable_adapter else model.merge_and_unload()

    def _add_lora(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(self.config.seed)
        lora = LoraConfig(
            r=self.config.lora_rank, lora_alpha=self.config.lora_alpha,
            target_modules=self.options.lora_target_modules,
            lora_dropout=0.0, task_type="CAUSAL_LM",  # dropout is off everywhere (eval mode)
        )
        return get_peft_model(model, lora)

    def identity(self) -> dict[str, str]:
        return dict(self._identity)

    def forward(self, batch: Batch) -> PairLogps:
        return FrozenClient(self.model, self.device).forward(batch)

    def reference_client(self, shared: bool) -> FrozenClient:
        if shared:
            if self.config.lora_rank <= 0:
                raise ConfigError("a shared (LoRA base) reference needs lora_rank > 0")
            if self.init is not None and self.init[0] == "adapter":
                raise ConfigError("with init_from an adapter, the LoRA base is not the initial "
                                  "policy: use reference = 'separate'")
            return FrozenClient(self.model, self.device, disable_adapter=True)
        reference = self._initial_model(trainable_adapter=False)
        reference.requires_grad_(False)
        return FrozenClient(reference.to(self.device).eval(), self.device)

    def forward_backward(self, batch: Batch, loss_fn: LossFn) -> Metrics:
        batch = batch.to(self.device)
        policy = PairLogps.from_rows(sequence_logps(self.model, batch))
        loss, metrics = loss_fn(policy, batch)
        loss.backward()
        return metrics

    def optim_step(self, params: AdamParams) -> Metrics:
        max_norm = params.max_grad_norm if params.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"gradient norm is {float(grad_norm)}; the step was not applied")
        for group in self.optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2),
                         eps=params.eps, weight_decay=params.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm)}

    def save_weights(self, path: str) -> None:
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp)

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        torch.save(self.optimizer.state_dict(), Path(path) / "optimizer.pt")

    def load_state(self, path: str) -> None:
        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise ConfigError(f"no weights (*.safetensors) in state directory {path}")
        weights = {k: v for f in files for k, v in load_file(str(f)).items()}
        if hasattr(self.model, "disable_adapter"):
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, weights)
        else:
            result = self.model.load_state_dict(weights, strict=False)
            tied = getattr(self.model.config, "tie_word_embeddings", False)
            missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
            if missing:
                raise ConfigError(f"state {path} lacks weights for {missing[:5]}")
        if result.unexpected_keys:
            raise ConfigError(f"state {path} does not match the model: {result.unexpected_keys[:5]}")
        optimizer = torch.load(Path(path) / "optimizer.pt", map_location=self.device,
                               weights_only=True)
        self.optimizer.load_state_dict(optimizer)

    def publish_weights(self, snapshot: str, step: int, deployment_id: str,
                        directory: str | None, keep: int) -> dict[str, Any]:
        """Write ``directory/snapshots/<snapshot>`` (weights, tokenizer, manifest.json), then
        switch ``directory/current`` to it atomically and prune old snapshots. A server that
        resolves ``current`` once per load never sees a half-written snapshot."""
        if directory is None:
            raise ConfigError("the local backend publishes to a directory: set [weight_sync] directory")
        root = Path(directory)
        with atomic_dir(root / "snapshots" / snapshot) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            manifest = {"snapshot": snapshot, "step": step, "deployment_id": deployment_id,
                        "base_model": self.config.base_model, "init_from": self.config.init_from,
                        "kind": "adapter" if self.config.lora_rank > 0 else "full",
                        "sha256": files_hash(Path(tmp)), "created": time.time()}
            (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=2))
        switch_symlink(root / "current", Path("snapshots") / snapshot)
        snapshots = sorted((root / "snapshots").iterdir())
        for old in snapshots[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return manifest

    def close(self) -> None:
        self.model = None
        self.params = []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _local(config: Config, options: LocalOptions, tokenizer: Any) -> LocalBackend:
    return LocalBackend(config, options, tokenizer)


@hookimpl
def register_backends(register: Any) -> None:
    register("local", _local, LocalOptions)
