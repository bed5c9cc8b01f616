"""The training loop. Read :func:`run` top to bottom: it is the whole algorithm."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import torch

from . import checkpoint, hookspecs, hub, refcache
from .config import Config
from .data import epoch_order, length_batches, load_pairs, make_format, split_eval, tokenize_pairs
from .errors import ConfigError, PluginError, TrainingError
from .fileio import atomic_write_json
from .manager import PluginManager, Registry, get_registry
from .types import AdamParams, Batch, Loss, LossFn, Metrics, PairLogps, TokenizedPair, collate


def log(message: str) -> None:
    """Progress messages go to stderr so stdout stays for results."""
    print(f"[preftune] {message}", file=sys.stderr, flush=True)


def run(config: Config, pm: PluginManager | None = None) -> dict[str, Any]:
    """Train with ``config``; return the final summary. This is the cookbook's ``main(cfg)``."""
    registry = get_registry(pm)
    config.check_plugin_tables(registry)
    # Build the cheap components first so a misspelled plugin name fails before any loading.
    loss: Loss = registry.build("loss", config.loss, config)
    fmt = make_format(registry, config)
    reference_name = resolve_reference(config, loss)
    if loss.needs_reference and reference_name == "none":
        raise ConfigError(f"loss {config.loss!r} needs a reference, but reference is 'none'")
    for kind, name in [("backend", config.backend), ("reference", reference_name)] + [
        ("sink", s) for s in config.sinks
    ]:
        registry.get(kind, name)
    log_path = Path(config.log_path)
    log_path.mkdir(parents=True, exist_ok=True)
    resolved = config.redacted(registry)  # secrets masked: what logs and sinks may see
    atomic_write_json(log_path / "config.json", resolved)
    seed_everything(config.seed)

    # the revision names a commit of base_model: it applies to the tokenizer only if they coincide
    same_repo = config.tokenizer_model in (None, config.base_model)
    tokenizer = hub.load_tokenizer(config.tokenizer_model or config.base_model,
                                   config.base_model_revision if same_repo else None)
    data = prepare_data(config, fmt, tokenizer)
    sinks = open_sinks(registry, config)
    summary: dict[str, Any] = {"status": "failed"}
    backend: Any = None
    try:
        backend = registry.build("backend", config.backend, config, tokenizer)
        reference = None
        if loss.needs_reference:
            provider = registry.build("reference", reference_name, config, backend)
            reference = reference_logps(config, provider, tokenizer, data)
            del provider  # a separate reference model is freed once its log-probs are cached
        hashes = {"config_sha256": checkpoint.training_hash(config, set(registry.names("sink"))),
                  "data_sha256": data.sha256}
        state = resume_state(config, backend, hashes)
        info = {**data.info(config), "resume_step": state.get("step", 0), "config": resolved}
        sinks.hook.preftune_run_start(config=config, info=info, backend=backend)

        evals: dict[int, dict[str, float]] = {}

        def evaluate(step: int) -> dict[str, float]:
            evals[step] = evaluate_pairs(backend, loss, reference, data, config)
            if evals[step]:
                sinks.hook.preftune_eval(step=step, metrics=evals[step])
            return evals[step]

        step = state.get("step", 0)
        first_eval = state["first_eval"] if "first_eval" in state else evaluate(0)
        tokens, done_s = state.get("tokens", 0), state.get("elapsed_s", 0.0)
        start = time.perf_counter() - done_s
        for epoch in range(config.epochs):
            order = [data.train[i] for i in epoch_order(len(data.train), config.seed, epoch)]
            for position, chunk in enumerate(chunks(order, config.batch_size * config.grad_accum)):
                if epoch * info["steps_per_epoch"] + position < step:
                    continue  # done before the checkpoint this run resumed from
                # One optimizer step: micro-batches weighted by their share of the step's pairs,
                # so the accumulated gradient equals the gradient of the whole step's batch.
                metrics: dict[str, Any] = {}
                for micro in chunks(chunk, config.batch_size):
                    batch = collate([data.pairs[i] for i in micro], micro, data.pad_id)
                    weight = len(micro) / len(chunk)
                    out = backend.forward_backward(batch, bind_loss(loss, reference, weight))
                    accumulate(metrics, out, weight)
                    tokens += batch.num_tokens
                check_finite(metrics, step + 1, [data.pairs[i] for i in chunk])
                lr = learning_rate(config, step, info["total_steps"])
                metrics.update(backend.optim_step(adam_params(config, lr)))
                step += 1
                elapsed = time.perf_counter() - start
                row = {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}, "lr": lr,
                       "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9),
                       "elapsed_s": elapsed}
                check_finite(row, step, [data.pairs[i] for i in chunk])
                sinks.hook.preftune_log_metrics(step=step, metrics=row)
                if config.eval_interval and step % config.eval_interval == 0:
                    evaluate(step)
                if config.checkpoint_interval and step % config.checkpoint_interval == 0:
                    saved = checkpoint.save(log_path, step, backend, {
                        **hashes, "tokens": tokens, "elapsed_s": elapsed, "epoch": epoch,
                        "first_eval": first_eval}, config.keep_checkpoints)
                    sinks.hook.preftune_checkpoint(step=step, path=str(saved))

        final_eval = evals[step] if step in evals else evaluate(step)
        weights = log_path / "final"
        backend.save_weights(str(weights))
        tokenizer.save_pretrained(str(weights))
        sinks.hook.preftune_checkpoint(step=step, path=str(weights))
        elapsed = time.perf_counter() - start
        summary = {"status": "completed", "steps": step, "tokens": tokens,
                   "train_s": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
                   "weights": str(weights), "initial_eval": first_eval, "final_eval": final_eval,
                   "dropped_pairs": len(data.report.dropped),
                   "truncated_pairs": len(data.report.truncated)}
        return summary
    except BaseException as exc:
        summary = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        sinks.hook.preftune_run_end(summary=summary)
        if backend is not None:
            backend.close()


def resume_state(config: Config, backend: Any, hashes: dict[str, str]) -> dict[str, Any]:
    """With ``resume``, restore the newest complete checkpoint; its trainer state, or {}."""
    checkpoint.remove_partial(config.log_path)
    if not config.resume:
        return {}
    found = checkpoint.complete(config.log_path)
    if not found:
        log(f"resume: no checkpoint in {checkpoint.root(config.log_path)}; starting from step 0")
        return {}
    state = checkpoint.restore(found[-1], backend, hashes)
    log(f"resumed from {found[-1]} (step {state['step']})")
    return state


@dataclass
class Data:
    """The run's tokenized pairs and which of them are for training and for evaluation."""

    pairs: list[TokenizedPair]
    train: list[int]
    eval: list[int]
    datasets: list[str]
    pad_id: int
    report: Any
    sha256: str  # of the tokenized pairs: keys the reference cache and checkpoints

    def eval_batches(self, size: int) -> list[list[int]]:
        return length_batches(self.pairs, self.eval, size)

    def info(self, config: Config) -> dict[str, Any]:
        per_step = config.batch_size * config.grad_accum
        steps = math.ceil(len(self.train) / per_step)
        return {"train_pairs": len(self.train), "eval_pairs": len(self.eval),
                "steps_per_epoch": steps, "total_steps": steps * config.epochs,
                "dropped_pairs": len(self.report.dropped),
                "truncated_pairs": len(self.report.truncated)}


def prepare_data(config: Config, fmt: Any, tokenizer: Any) -> Data:
    """Parse and tokenize the dataset (and eval set), then split off the held-out pairs."""
    datasets = [config.dataset] + ([config.eval_dataset] if config.eval_dataset else [])
    if config.eval_dataset and Path(config.eval_dataset).resolve() == Path(config.dataset).resolve():
        raise ConfigError("eval_dataset is the training dataset; held-out pairs must be other pairs")
    train_raw = load_pairs(config.dataset, fmt)
    if config.max_pairs:
        train_raw = train_raw[: config.max_pairs]
    eval_raw = load_pairs(config.eval_dataset, fmt) if config.eval_dataset else []
    pairs, report = tokenize_pairs(tokenizer, train_raw + eval_raw, config.max_seq_len)
    for line in report.lines(config.max_seq_len):
        log(line)
    eval_files = {config.eval_dataset}
    is_eval = [p.source is not None and p.source.file in eval_files for p in pairs]
    if config.eval_dataset:
        train = [i for i, e in enumerate(is_eval) if not e]
        held = [i for i, e in enumerate(is_eval) if e]
    else:
        train, held = split_eval(len(pairs), config.eval_fraction, config.seed)
    if not train:
        raise ConfigError(f"no training pairs left in {config.dataset} after tokenization")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log(f"{len(train)} training pairs, {len(held)} held-out pairs")
    return Data(pairs, train, held, datasets, pad_id, report, refcache.data_hash(pairs))


def resolve_reference(config: Config, loss: Loss) -> str:
    """``auto``: none for a loss that needs none, the LoRA base for LoRA, else a frozen copy."""
    if config.reference != "auto":
        return config.reference
    if not loss.needs_reference:
        return "none"
    # After a warm start the reference is the initial policy, which the LoRA base may not be.
    return "lora_shared" if config.lora_rank > 0 and not config.init_from else "separate"


def reference_logps(config: Config, provider: Any, tokenizer: Any, data: Data) -> Any:
    """Reference log-probs of all pairs, from the on-disk cache when its key still matches."""
    if provider is None:
        raise ConfigError(f"loss {config.loss!r} needs a reference, but reference is 'none'")
    parts = {**provider.identity(), **hub.tokenizer_identity(tokenizer),
             "max_seq_len": str(config.max_seq_len), "data_sha256": data.sha256}
    parts = {k: str(v) for k, v in parts.items()}
    cache_dir = Path(config.cache_dir) if config.cache_dir else refcache.default_cache_dir()
    cache_file = refcache.cache_file_for(cache_dir, config.base_model, data.datasets)
    size = eval_batch_size(config)
    batches = length_batches(data.pairs, data.train, size) + data.eval_batches(size)
    return refcache.load_or_compute(cache_file, parts, lambda: provider, data.pairs, batches,
                                    data.pad_id, log)


def bind_loss(loss: Loss, reference: Any, weight: float) -> LossFn:
    """The loss of one micro-batch with its reference rows, scaled by its share of the step."""

    def loss_fn(policy: PairLogps, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        ref = reference.for_batch(batch) if reference is not None else None
        value, metrics = loss(policy, ref, batch)
        return value * weight, {"loss": value.detach(), **metrics}

    return loss_fn


@torch.no_grad()
def evaluate_pairs(backend: Any, loss: Loss, reference: Any, data: Data,
                   config: Config) -> dict[str, float]:
    """Held-out metrics (``eval_`` + each loss metric), means over the held-out pairs."""
    if not data.eval:
        return {}
    totals: dict[str, Any] = {}
    for index in data.eval_batches(eval_batch_size(config)):
        batch = collate([data.pairs[i] for i in index], index, data.pad_id)
        ref = reference.for_batch(batch) if reference is not None else None
        value, metrics = loss(backend.forward(batch), ref, batch)
        accumulate(totals, {"loss": value, **metrics}, len(index) / len(data.eval))
    return {f"eval_{k}": float(v) for k, v in totals.items()}


def open_sinks(registry: Registry, config: Config) -> pluggy.PluginManager:
    """A plugin manager holding only the sinks this run selected."""
    if len(set(config.sinks)) != len(config.sinks):
        raise ConfigError(f"sinks lists a sink twice: {config.sinks}")
    sinks = pluggy.PluginManager("preftune")
    sinks.add_hookspecs(hookspecs)
    for name in config.sinks:
        sinks.register(registry.build("sink", name, config), name=name)
    try:
        sinks.check_pending()  # a misspelled event method would otherwise never be called
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"sink {sinks.get_name(exc.plugin)!r}: {exc}") from None
    return sinks


def eval_batch_size(config: Config) -> int:
    """Forward-only batches (reference pass, evaluation) hold no activations: make them larger."""
    return max(2 * config.batch_size, 8)


def accumulate(total: dict[str, Any], metrics: Metrics, weight: float) -> None:
    for key, value in metrics.items():
        value = value.detach() if isinstance(value, torch.Tensor) else value
        total[key] = total.get(key, 0.0) + value * weight


def check_finite(metrics: dict[str, Any], step: int, pairs: Sequence[TokenizedPair]) -> None:
    """A NaN or infinite loss or gradient stops the run before the optimizer step applies it."""
    for key in ("loss", "grad_norm"):
        if key in metrics and not math.isfinite(float(metrics[key])):
            where = ", ".join(str(p.source) for p in pairs[:8])
            raise TrainingError(f"{key} is {float(metrics[key])} at step {step}; pairs: {where}")


def adam_params(config: Config, lr: float) -> AdamParams:
    return AdamParams(lr, config.beta1, config.beta2, config.eps, config.weight_decay,
                      config.max_grad_norm)


SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def learning_rate(config: Config, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): warmup, then the schedule."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.learning_rate * SCHEDULES[config.lr_schedule](progress)


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
