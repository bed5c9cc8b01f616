"""The ``local`` backend: torch + transformers (+ peft for LoRA) in this process, CPU or CUDA.

It exposes the verbs of the training SDKs' clients (forward, forward_backward with a custom loss,
optim_step with Adam params, save/load state, save weights), so remote backends slot in beside it.
How log-probs are computed (the prompt shared by chosen and rejected, the output layer only on
completion positions, in chunks) is in ``local_engine``. The model stays in eval mode so policy
and reference log-probs agree; only LoRA dropout, in training steps, is on (``local_lora``).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from preftune import (
    AdamParams,
    Config,
    ConfigError,
    LossFn,
    Metrics,
    PairLogps,
    TokenizedPair,
    TrainingError,
    hookimpl,
    log,
)
from preftune.backend_utils import (
    files_identity,
    load_causal_lm,
    model_identity,
    peak_rss_mb,
    resolve_init,
)
from preftune.plugins import local_state
from preftune.plugins.local_attention import pick_attention, runnable
from preftune.plugins.local_checks import check_settings, model_structure, resolve_device
from preftune.plugins.local_engine import (
    Engine,
    Logps,
    Plan,
    auto_chunk,
    calibrate,
    checkpoint_layers,
    decoder_layers,
    vocab_size,
)
from preftune.plugins.local_lora import (
    MERGED,
    check_mergeable,
    export_merged,
    lora_dropout_on,
    save_merged,
    set_lora_dropout,
)
from preftune.plugins.local_parallel import (
    full_state,
    gradient_sync,
    resolve_parallel,
    wrap,
)
from preftune.plugins.local_precision import (
    DTYPE_NAMES,
    Stepper,
    all_finite,
    first_bad,
    keep_masters,
    make_optimizer,
    make_scaler,
    replaced_dtype,
    resolve_precision,
)
from preftune.plugins.local_threads import cpu_threads, machine_threads
from preftune.world import World


class LocalOptions(BaseModel):
    """Options of the ``[local]`` table."""

    model_config = ConfigDict(extra="forbid")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"] = Field(
        "auto", description="fp32; bf16-mixed / fp16-mixed: float32 masters of what trains, the "
        "forward under autocast, frozen weights in the low dtype; bf16-true: all bfloat16 "
        "(Kahan-compensated updates); auto: bf16-mixed on a CUDA GPU with bfloat16, else fp32."
    )
    dtype: Any = Field(None, exclude=True, description="Removed: replaced by precision.")
    lora_target_modules: str | list[str] = Field(
        "all-linear", description="peft target_modules for LoRA."
    )
    layout: Literal["auto", "shared", "padded"] = Field(
        "auto", description="shared: the prompt computed once per pair (checked against padded at "
        "start); padded: one row per sequence; auto: shared where the model supports it."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention implementation transformers loads the model with; auto: sdpa "
        "(else eager), flash_attention_2 first for layout = 'padded' where it is installed."
    )
    threads: int = Field(
        0, ge=0, le=1024, description="CPU threads; 0 = the cores that are idle when the run starts "
        "(within the CPU affinity and a cgroup quota), at least 1."
    )
    logits_chunk: int = Field(
        0, ge=0, description="Positions per output-layer chunk; 0 = about 64 MiB of float32 logits."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass instead of "
        "keeping them: much less memory, about a third more compute."
    )
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA: dropout on the adapter's input in training steps "
        "(peft's lora_dropout); evaluation and the reference pass run without it."
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Under torchrun: ddp (every rank holds the model, gradients are "
        "averaged) or fsdp (parameters, gradients and optimizer state sharded with fully_shard per "
        "decoder layer); auto: ddp. One process ignores it. Both train the same weights, so a run "
        "may resume with the other.",
        json_schema_extra={"operational": True},
    )
    dist_timeout_s: float = Field(
        600.0, gt=0, description="Under torchrun: how long a rank waits in a collective for the "
        "others before the run stops (a rank that died or hangs).",
        json_schema_extra={"operational": True},
    )
    merge_lora: bool = Field(
        False, description="LoRA: final/merged/ also holds the model with the adapter merged, a "
        "plain Hugging Face model directory.",
        json_schema_extra={"operational": True},  # what is written at the end, not what is trained
    )

    @field_validator("dtype")
    @classmethod
    def _dtype_replaced(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(replaced_dtype(value))
        return value


class FrozenClient:
    """Forward-only log-probs of a model, optionally with its LoRA adapter disabled."""

    def __init__(self, engine: Engine, owned: bool):
        self.engine, self.owned = engine, owned

    def forward(self, pairs: Sequence[TokenizedPair], token_logps: bool = False) -> PairLogps:
        return self.engine.frozen(pairs, token_logps)

    def close(self) -> None:
        """Free a separate reference model (the shared base belongs to the policy)."""
        if self.owned:
            self.engine.model = None
            free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def set_threads(device: torch.device, requested: int) -> None:
    """CPU threads for this process (see ``LocalOptions.threads``); ``0`` says what it picked."""
    if device.type != "cpu":
        return
    if requested > 0:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" in os.environ:
        log(f"local backend: {cpu_threads(torch.get_num_threads())} (threads = 0: OMP_NUM_THREADS)")
    else:
        threads, why = machine_threads()
        torch.set_num_threads(threads)
        log(f"local backend: {cpu_threads(threads)} (threads = 0: {why})")


class LocalBackend:
    """The policy in this process; see the module docstring. The class is the registered
    factory; :meth:`check` refuses settings it cannot use before anything loads."""

    check = staticmethod(check_settings)
    guards_nonfinite = True  # optim_step never applies a non-finite gradient (see there)

    def __init__(self, config: Config, options: LocalOptions, tokenizer: Any,
                 world: World | None = None):
        self.config, self.options, self.tokenizer = config, options, tokenizer
        self.world = world or World()
        self.parallel = resolve_parallel(options.parallel, self.world.size)
        self.device = resolve_device(config.device)
        if self.parallel and self.device.type == "cuda":  # torchrun's LOCAL_RANK chose the GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = resolve_precision(options.precision, self.device)
        log(f"local backend: precision {self.precision.name}"
            + (" (auto)" if options.precision == "auto" else "")
            + ("; float16 on a CPU has no fast kernels (measured about 20x slower than fp32): "
               "use fp32 or bf16-mixed here" if self.precision.compute == torch.float16
               and self.device.type == "cpu" else ""))
        self.init = resolve_init(config.init_from) if config.init_from else None
        self.attention = self._attention()
        model = self._initial_model(trainable_adapter=config.lora_rank > 0)
        vocab = vocab_size(model)
        if len(tokenizer) > vocab:
            raise ConfigError(
                f"tokenizer {config.tokenizer_model or config.base_model!r} has {len(tokenizer)} "
                f"tokens but model {config.base_model!r} only {vocab} embeddings"
            )
        self._identity = model_identity(config.base_model, config.base_model_revision,
                                        None if self.init else model)
        self._identity["dtype"] = DTYPE_NAMES[self.precision.compute]  # reference log-probs depend on it
        self._identity["weights_dtype"] = DTYPE_NAMES[self.weights_dtype]
        self._identity["attention"] = self.attention  # and on its rounding
        if self.init:
            self._identity.update(init_from=str(self.init[1]),
                                  init_files_sha256=files_identity(self.init[1]))
        if config.lora_rank > 0 and not hasattr(model, "disable_adapter"):
            model = self._add_lora(model)
        set_threads(self.device, options.threads)
        self.model = model.to(self.device).eval()  # eval: no dropout but LoRA's in training steps
        self.lora_dropouts = set_lora_dropout(self.model, options.lora_dropout)
        if options.merge_lora:
            check_mergeable(self.model)  # before training, not after it
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        keep_masters(self.params, self.precision.master)
        self.optimizer = make_optimizer(self.params, config.learning_rate, (config.beta1, config.beta2),
                                        config.eps, config.weight_decay, self.precision)
        self.stepper = Stepper(self.params, self.optimizer, make_scaler(self.precision, self.device))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.plan = self._plan(self.model)
        if options.activation_checkpointing and not checkpoint_layers(self.model):
            raise ConfigError("[local] activation_checkpointing: no stack of decoder layers found")
        self.runner = self._wrap() if self.parallel else None
        self.engine = Engine(self.model, self.device, self.pad_id, self.plan,
                             compute=self.precision.compute, runner=self.runner,
                             sharded=self.parallel == "fsdp")

    def _wrap(self) -> torch.nn.Module:
        """The DDP or FSDP wrapper every rank's forward runs through (see ``local_parallel``)."""
        log(f"local backend: {self.parallel} over {self.world.size} processes")
        runner = wrap(Logps(self.model, self.plan), self.parallel, decoder_layers(self.model),
                      self.precision.compute, self.precision.master)
        if self.parallel == "fsdp":  # the optimizer steps the shards
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = make_optimizer(self.params, self.config.learning_rate,
                                            (self.config.beta1, self.config.beta2), self.config.eps,
                                            self.config.weight_decay, self.precision)
            self.stepper = Stepper(self.params, self.optimizer, make_scaler(self.precision, self.device),
                                   sharded=True)
        return runner

    def _attention(self) -> str:
        """The attention implementation to load (``auto`` resolved and said once)."""
        requested = self.options.attn_implementation
        runs = () if requested != "auto" else runnable(model_structure(self.config)[1], self.device,
                                                        self.precision.compute)
        name = pick_attention(requested, self.options.layout, runs)
        log(f"local backend: attention {name}" + (" (auto)" if requested == "auto" else ""))
        return name

    def _plan(self, model: Any) -> Plan:
        """How this model computes log-probs (checked once); each fallback is said once."""
        chunk = auto_chunk(model, self.options.logits_chunk)
        plan = calibrate(model, self.device, self.options.layout, chunk, self.config.max_seq_len,
                         self.precision.compute)
        for note in plan.notes:
            log(f"local backend: {note}")
        if self.options.layout == "shared" and plan.layout != "shared":
            raise ConfigError("[local] layout = 'shared' is not possible with this model: "
                              + plan.notes[-1])
        return plan

    @property
    def weights_dtype(self) -> torch.dtype:
        """What the initial weights are stored in: the precision's masters when all of them
        train (a full fine-tune), else its frozen dtype (a LoRA base)."""
        return self.precision.load_dtype(self.config.lora_rank == 0)

    def _initial_model(self, trainable_adapter: bool) -> Any:
        """The weights training starts from: ``init_from`` if set, else the base model, in
        :attr:`weights_dtype`. A warm start adapter stays a trainable adapter for LoRA, and is
        merged otherwise."""
        cfg = self.config
        dtype = self.weights_dtype
        if self.init is not None and self.init[0] == "model":
            return load_causal_lm(str(self.init[1]), None, dtype, self.attention)
        base = load_causal_lm(cfg.base_model, cfg.base_model_revision, dtype, self.attention)
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
            lora_dropout=self.options.lora_dropout, task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    def identity(self) -> dict[str, str]:
        return dict(self._identity)

    def default_reference(self) -> str:
        """What ``reference = "auto"`` means here: the LoRA base (adapter off) when it is the
        initial policy, else a frozen copy of the initial weights."""
        return "lora_shared" if self.config.lora_rank > 0 and not self.config.init_from else "separate"

    def forward(self, pairs: Sequence[TokenizedPair], token_logps: bool = False) -> PairLogps:
        return self.engine.frozen(pairs, token_logps)

    def reference_client(self, shared: bool) -> FrozenClient:
        if shared:
            if self.config.lora_rank <= 0:
                raise ConfigError("a shared (LoRA base) reference needs lora_rank > 0")
            if self.init is not None and self.init[0] == "adapter":
                raise ConfigError("with init_from an adapter, the LoRA base is not the initial "
                                  "policy: use reference = 'separate'")
            engine = Engine(self.model, self.device, self.pad_id, self.plan, disable_adapter=True,
                            compute=self.precision.compute, runner=self.runner,
                            sharded=self.parallel == "fsdp")
            return FrozenClient(engine, owned=False)
        # stored as the policy's initial weights are (float32 masters for a full fine-tune under the
        # mixed precisions), so the two agree exactly before the first step; its forward pass
        # comes before the optimizer's state exists, so this adds nothing to training's peak
        reference = self._initial_model(trainable_adapter=False)
        reference.requires_grad_(False)
        engine = Engine(reference.to(self.device).eval(), self.device, self.pad_id, self.plan,
                        compute=self.precision.compute)
        return FrozenClient(engine, owned=True)

    def forward_backward(self, pairs: Sequence[TokenizedPair], loss_fn: LossFn) -> Metrics:
        syncs = getattr(loss_fn, "syncs", True)  # the step's last micro-batch (several processes)
        with lora_dropout_on(self.lora_dropouts), gradient_sync(self.runner, self.parallel, syncs):
            policy = self.engine(pairs, loss_fn.needs_token_logps)
            loss, metrics = loss_fn(policy)
            self.stepper.backward(loss)  # scaled under fp16-mixed
        return metrics

    def optim_step(self, params: AdamParams) -> Metrics:
        """Apply the accumulated gradient, with no host sync: a non-finite gradient norm is kept
        out of the weights on the device (``guards_nonfinite``), and the loop, resolving the
        returned tensors in the step's one sync, stops the run on it. Under fp16-mixed an
        overflow is the scaler's: the step is skipped (``step_skipped``)."""
        return self.stepper.step(params)

    def sample(self, prompts: Sequence[Sequence[int]], max_tokens: int,
               stop: Sequence[int]) -> list[list[int]]:
        """Greedy completions by the policy as it is now (``eval_samples``), with LoRA
        dropout off as in every forward outside a training step, ``batch_size`` prompts at a time
        (the memory a micro-batch's training takes bounds theirs)."""
        size = self.config.batch_size
        return [tokens for start in range(0, len(prompts), size)
                for tokens in self.engine.generate(prompts[start : start + size], max_tokens, stop)]

    def peak_mem_mb(self) -> float:
        """Peak memory so far, in MiB: the GPU's peak allocation on CUDA, else peak RSS."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / (1 << 20)
        return peak_rss_mb()

    def summary(self) -> dict[str, Any]:
        """What the run's summary shows of this backend: its precision, and under fp16-mixed
        how many steps the loss scaler skipped (one host sync)."""
        skipped = {"skipped_steps": int(self.stepper.skipped)} if self.stepper.scaler else {}
        return {"precision": self.precision.name, **skipped}

    def check_weights(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """Refuse to write weights that hold a NaN or an infinity (they would load, and serve
        garbage); names the first bad parameter (looked for only when there is one)."""
        named = list(state.items()) if state is not None else [
            (n, p.detach()) for n, p in self.model.named_parameters()]
        if not all_finite([t for _, t in named]):
            name = first_bad(iter(named))
            raise TrainingError(f"weight {name!r} holds NaN or infinite values; not saved")

    def save_weights(self, path: str | None) -> None:
        """Write the weights into ``path`` (the loop gives a temporary directory that becomes
        ``final/`` with the tokenizer, in one rename); with ``merge_lora``, also the merged model
        and the tokenizer into ``path/merged``. Under FSDP every rank takes part in gathering
        them; ranks other than the main one get no ``path``."""
        state = full_state(self.runner, self.model, self.parallel)
        if path is None:
            return
        self.check_weights(state)
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, **({"state_dict": state} if state is not None else {}))
        if self.options.merge_lora:  # refused at start under fsdp (check_parallel_options)
            save_merged(self.model, self.tokenizer, Path(path) / MERGED)

    @staticmethod
    def export(config: Config, options: LocalOptions, final: Path, out: str) -> None:
        """``preftune export --merge``: the finished run's adapter (``final``) merged into its
        base model, loaded in the dtype the run stored it in (its precision's frozen dtype on this
        machine), written to ``out``."""
        device = torch.device("cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu")
        export_merged(config, final, out, resolve_precision(options.precision, device).frozen)

    def save_state(self, path: str) -> None:
        """The weights (or adapter), the optimizer's state and what else an exact resume needs
        (``local_state``). Under several processes every rank is called with the same ``path``."""
        local_state.save_state(self, path)

    def load_state(self, path: str) -> None:
        local_state.load_state(self, path)

    def publish_weights(self, snapshot: str, step: int, deployment_id: str,
                        directory: str | None, keep: int) -> dict[str, Any]:
        """A weight snapshot in ``directory``, switched to atomically (``local_state``)."""
        return local_state.publish_weights(self, snapshot, step, deployment_id, directory, keep)

    def close(self, status: str = "completed") -> None:
        self.model = self.engine = self.optimizer = None
        self.params = []
        free_memory()


@hookimpl
def register_backends(register: Any) -> None:
    register("local", LocalBackend, LocalOptions)
