"""The training loop. Read :func:`run` top to bottom: it is the whole algorithm."""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, hub, refcache, tiny
from .advice import ignored_settings, no_held_out, schedule_notes
from .backend_utils import peak_rss_mb
from .config import Config
from .data import (
    check_held_out,
    epoch_order,
    keep_repeats_in_train,
    length_batches,
    make_format,
    no_training_pairs,
    split_eval,
)
from .data.pipeline import open_datasets, prepare
from .data.sources import Opened
from .errors import ConfigError, PreftuneError
from .fileio import atomic_dir, atomic_write_json, ensure_dir, remove_stale, run_lock
from .manager import PluginManager, Registry, get_registry
from .messages import log
from .model_card import model_card
from .outputs import Output, check_outputs
from .samples import eval_samples, sampled_pairs
from .secrets import mask_secrets
from .signals import Stopped, StopSignals, resume_advice
from .sinks import open_sinks
from .step import (  # noqa: F401  (BoundLoss, optimizer_step: tests and bench import them here)
    BoundLoss,
    agreed_stop,
    chunks,
    eval_batch_size,
    evaluate_pairs,
    optimizer_step,
    token_level,
    train_step,
)
from .types import AdamParams, Loss, TokenizedPair
from .weights import check_local_name
from .world import DEFAULT_TIMEOUT_S, World, make_world, world_env


def run(config: Config, pm: PluginManager | None = None, *, dataset: Any = None,
        eval_dataset: Any = None) -> dict[str, Any]:
    """Train with ``config``; return the final summary. This is the cookbook's ``main(cfg)``.
    ``dataset`` / ``eval_dataset`` take a ``datasets.Dataset`` (or any sized iterable of record
    dicts) in place of the settings of the same names. Started by ``torchrun``, every process
    runs this; they train as one (see :mod:`preftune.world`)."""
    registry = get_registry(pm)
    config.check_plugin_tables(registry)
    # Build the cheap components first so a misspelled plugin name fails before any loading.
    loss: Loss = registry.build("loss", config.loss, config)
    fmt = make_format(registry, config)
    if loss.needs_reference and config.reference == "none":
        raise ConfigError(f"loss {config.loss!r} needs a reference, but reference is 'none'")
    for note in ignored_settings(config, loss):
        log(note)
    for kind, name in [("backend", config.backend)] + [("sink", s) for s in config.sinks] + (
            [("reference", config.reference)] if config.reference != "auto" else []):
        registry.check(kind, name, config)  # exists, and can use these settings
    check_parallel(registry, config)
    # outputs first: an input named like an output is refused as one, whatever else is wrong
    check_outputs(config, cache_dir(config), plugin_outputs(registry, config))
    opened = check_inputs(registry, config, {"dataset": dataset, "eval_dataset": eval_dataset})
    world = make_world(dist_timeout(registry, config))
    try:
        config = restarted(config, world)
        if config.resume:
            checkpoint.check_resumable(config.log_path)
        else:
            checkpoint.check_fresh(config.log_path)
        ensure_dir(cache_dir(config), "cache_dir")  # a file, unwritable: said before loading
        log_path = ensure_dir(config.log_path, "log_path")
        with ExitStack() as held:  # a second run on this log_path stops here, naming the first
            world.first("taking the lock of log_path", lambda: held.enter_context(run_lock(log_path)))
            summary = train(config, registry, loss, fmt, log_path, opened, world)
        world.close()
        return summary
    except Stopped:
        world.close()  # every rank stopped at the same step: leave together
        raise
    except BaseException:
        world.close(wait=False)  # the others may be in another collective: do not wait for them
        raise


def loss_options(registry: Registry, config: Config) -> dict[str, Any]:
    """The loss's options table as the run used it (defaults included), for the model card."""
    component = registry.get("loss", config.loss)
    if component.options is None:
        return {}
    return config.options_for(config.loss, component.options).model_dump(mode="json", by_alias=True)


def every_rank_sinks(registry: Registry, config: Config) -> list[str]:
    """The sinks that run on every rank, not on the main one alone: those whose factory says
    ``every_rank = True`` (``weight_sync``: the backend gathers sharded weights on every rank)."""
    return [name for name in config.sinks
            if getattr(registry.get("sink", name).factory, "every_rank", False)]


def check_parallel(registry: Registry, config: Config) -> None:
    """Under torchrun, a backend that cannot train as several processes (a remote service) is
    refused before anything starts."""
    _, size, _ = world_env()
    if size > 1 and not takes_world(registry.get("backend", config.backend).factory):
        raise ConfigError(f"backend {config.backend!r} does not train as several processes "
                          f"(WORLD_SIZE is {size}: started by torchrun?); start it as one process")


def takes_world(factory: Any) -> bool:
    """Whether a backend factory takes the run's :class:`World` (a ``world`` keyword)."""
    try:
        return "world" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def dist_timeout(registry: Registry, config: Config) -> float:
    """The backend's ``dist_timeout_s`` option (how long a collective may wait), if it has one."""
    component = registry.get("backend", config.backend)
    options = config.options_for(config.backend, component.options) if component.options else None
    return float(getattr(options, "dist_timeout_s", DEFAULT_TIMEOUT_S))


def restarted(config: Config, world: World) -> Config:
    """A job torchrun restarted (``--max-restarts``) resumes from its newest checkpoint."""
    if world.restarts and not config.resume and checkpoint.complete(config.log_path):
        log(f"torchrun restarted this job (restart {world.restarts}): resuming from the newest "
            f"checkpoint in {checkpoint.root(config.log_path)}")
        return config.model_copy(update={"resume": True})
    return config


def check_inputs(registry: Registry, config: Config, objects: dict[str, Any] | None = None) -> list[Opened]:
    """The data sets can be read and the tokenizer's name can be found: said before the log
    directory is made (the model's name is its backend's to check)."""
    opened = open_datasets(registry, config, objects)
    if config.tokenizer_model and not tiny.is_builtin(config.tokenizer_model):
        check_local_name(config.tokenizer_model, "tokenizer_model")
    return opened


def plugin_outputs(registry: Registry, config: Config) -> list[Output]:
    """Paths the run's sinks and backend write outside log_path (their factory's optional
    ``outputs(config, options)``: ``(path, what, setting)`` triples)."""
    found = []
    for kind, name in [("backend", config.backend)] + [("sink", s) for s in config.sinks]:
        component = registry.get(kind, name)
        outputs = getattr(component.factory, "outputs", None)
        if callable(outputs):
            options = config.options_for(name, component.options) if component.options else None
            found += [Output(Path(path), what, key) for path, what, key in outputs(config, options)]
    return found


def train(config: Config, registry: Registry, loss: Loss, fmt: Any, log_path: Path,
          opened: list[Opened], world: World | None = None) -> dict[str, Any]:
    """The run itself, once its components are known to exist and ``log_path`` is ours."""
    world = world or World()
    resolved = config.redacted(registry)  # secrets masked: what logs and sinks may see

    def start_log() -> None:
        remove_interrupted_saves(log_path, cache_dir(config))
        (log_path / checkpoint.SUMMARY).unlink(missing_ok=True)  # an earlier run's; this one is on
        atomic_write_json(log_path / "config.json", resolved)

    world.first("writing config.json", start_log)
    seed_everything(config.seed)

    # the revision names a commit of base_model: it applies to the tokenizer only if they coincide
    same_repo = config.tokenizer_model in (None, config.base_model)
    tokenizer = hub.load_tokenizer(config.tokenizer_model or config.base_model,
                                   config.base_model_revision if same_repo else None)
    data = prepare_data(config, registry, fmt, tokenizer, opened, log_path, world)
    sinks = world.first("starting the sinks", lambda: open_sinks(registry, config)) \
        or open_sinks(registry, config, names=every_rank_sinks(registry, config))
    summary: dict[str, Any] = {"status": "failed"}
    backend: Any = None
    stopped: Stopped | None = None
    stop = StopSignals().install()  # SIGTERM, Ctrl-C: stop at the next step boundary
    try:
        backend = registry.build("backend", config.backend, config, tokenizer,
                                 **({"world": world} if world.size > 1 else {}))
        stop.check(step=0, signum=agreed_stop(world, stop.signum))  # provisioning a remote
        # trainer can take minutes: a signal ends it here
        # before any work: a sink checks what it will ask of the backend (weight_sync: its deployment)
        sinks.hook.preftune_backend_ready(config=config, backend=backend)
        reference, reference_s = None, time.perf_counter()
        if loss.needs_reference:
            name = resolve_reference(config, loss, backend)
            provider = registry.build("reference", name, config, backend)
            try:
                reference = reference_logps(config, provider, tokenizer, data, token_level(loss), world)
            finally:
                close_quietly(provider)  # a frozen model is freed, a remote job deleted, now
        reference_s = time.perf_counter() - reference_s
        stop.check(step=0, signum=agreed_stop(world, stop.signum))
        hashes = {"config_sha256": checkpoint.training_hash(config, set(registry.names("sink")),
                                                            registry.operational_keys()),
                  "data_sha256": data.sha256}
        state = resume_state(config, backend, hashes, world)
        if len(set(world.gather(state.get("step", 0)))) > 1:  # a shared file system that lags
            raise ConfigError(f"{world.tag}the ranks resumed from different checkpoints of "
                              f"{checkpoint.root(log_path)}: every rank must see the same files")
        info = {**data.info(config), "resume_step": state.get("step", 0), "config": resolved,
                "processes": world.size}
        for note in schedule_notes(config, info["total_steps"], len(data.eval)):
            log(note)
        sinks.run_start(config=config, info=info, backend=backend)  # on failure, ends every sink

        evals: dict[int, dict[str, float]] = {}
        saved: Path | None = None

        sampled = sampled_pairs(config, backend, data, config.backend)

        def evaluate(step: int) -> dict[str, float]:
            evals[step] = evaluate_pairs(backend, loss, reference, data, config, world)
            if evals[step]:
                sinks.hook.preftune_eval(step=step, metrics=evals[step])
            if sampled:
                rows = eval_samples(backend, tokenizer, data, sampled, config, step, world)
                sinks.hook.preftune_log_samples(step=step, samples=rows)
            return evals[step]

        def save_checkpoint(step: int, epoch: int, tokens: int, elapsed: float) -> Path:
            path = checkpoint.save(log_path, step, backend, {
                **hashes, "tokens": tokens, "elapsed_s": elapsed, "epoch": epoch,
                "first_eval": first_eval}, config.keep_checkpoints, world)
            sinks.hook.preftune_checkpoint(step=step, path=str(path))
            return path

        step = state.get("step", 0)
        first_eval = state["first_eval"] if "first_eval" in state else evaluate(0)
        tokens, done_s = state.get("tokens", 0), state.get("elapsed_s", 0.0)
        start = time.perf_counter() - done_s
        for epoch in range(config.epochs):
            order = [data.train[i] for i in epoch_order(len(data.train), config.seed, epoch)]
            for position, chunk in enumerate(chunks(order, config.batch_size * config.grad_accum)):
                if epoch * info["steps_per_epoch"] + position < step:
                    continue  # done before the checkpoint this run resumed from
                lr = learning_rate(config, step, info["total_steps"])
                step += 1
                metrics, signum = train_step(backend, loss, reference, data, chunk, config,
                                             adam_params(config, lr), step, world, stop)
                tokens += sum(data.pairs[i].num_tokens for i in chunk)
                elapsed = time.perf_counter() - start
                row = {"epoch": epoch, **metrics, "lr": lr, "tokens": tokens,
                       "tokens_per_s": tokens / max(elapsed, 1e-9), "elapsed_s": elapsed,
                       "peak_mem_mb": peak_mem_mb(backend)}
                sinks.hook.preftune_log_metrics(step=step, metrics=row)
                if config.eval_interval and step % config.eval_interval == 0:
                    evaluate(step)
                if config.checkpoint_interval and step % config.checkpoint_interval == 0:
                    saved = save_checkpoint(step, epoch, tokens, elapsed)
                if signum is not None:  # asked on any rank: every rank stops after this step
                    if config.checkpoint_interval and step % config.checkpoint_interval:
                        saved = save_checkpoint(step, epoch, tokens, elapsed)
                    raise Stopped(signum, step, saved)  # None when checkpointing is off

        final_eval = evals[step] if step in evals else evaluate(step)

        def card(adapter: bool) -> str:
            datasets = [(o.key, o.name, o.identity()) for o in opened]
            return model_card(resolved, datasets, step, final_eval, adapter, loss_options(registry, config))

        weights, remote = save_final(backend, tokenizer, log_path / "final", world, card)
        sinks.hook.preftune_checkpoint(step=step, path=weights)
        elapsed = time.perf_counter() - start
        summary = {"status": "completed", "steps": step, "tokens": tokens,
                   "train_s": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
                   "weights": weights, "initial_eval": first_eval, "final_eval": final_eval,
                   "dropped_pairs": len(data.report.dropped),
                   "truncated_pairs": len(data.report.truncated), "skipped_records": data.skipped,
                   "prepare_s": data.prepare_s, "reference_s": reference_s,
                   "peak_rss_mb": peak_rss_mb(), "peak_mem_mb": peak_mem_mb(backend),
                   **({"processes": world.size} if world.size > 1 else {}),
                   **backend_summary(backend), **remote}
        return summary
    except BaseException as exc:
        stopped = exc if isinstance(exc, Stopped) else None
        status = "stopped" if stopped else "failed"
        summary = {"status": status, "error": mask_secrets(f"{type(exc).__name__}: {exc}")}
        raise
    finally:
        stop.restore()
        if world.is_main:
            write_summary(log_path, summary)
        sink_error = sinks.run_end(summary)  # every sink's run_end, even when one raises
        if backend is not None:
            backend.close(summary["status"])  # a remote backend ends its jobs and sessions
            resume_advice(backend, summary["status"], stopped)  # what a resume cannot use
        if sink_error is not None:
            raise sink_error


def write_summary(log_path: Path, summary: dict[str, Any]) -> None:
    """``summary.json``: how the run ended (a resume of a completed run is refused by it). A disk
    that refuses it must not hide the run's own outcome."""
    try:
        atomic_write_json(log_path / checkpoint.SUMMARY, summary)
    except (OSError, PreftuneError) as exc:
        log(f"could not write {log_path / checkpoint.SUMMARY}: {exc}")


def backend_summary(backend: Any) -> dict[str, Any]:
    """What the backend adds to the run's summary (its precision, skipped steps), if anything."""
    summary = getattr(backend, "summary", None)
    return dict(summary()) if callable(summary) else {}


def resume_state(config: Config, backend: Any, hashes: dict[str, str],
                 world: World | None = None) -> dict[str, Any]:
    """With ``resume``, restore the newest readable checkpoint; its trainer state, or {}."""
    return checkpoint.resume(config.log_path, backend, hashes, world) if config.resume else {}


def save_final(backend: Any, tokenizer: Any, path: Path, world: World | None = None,
               card: Callable[[bool], str] | None = None) -> tuple[str, dict[str, Any]]:
    """The final weights, the tokenizer and its chat template as one directory: written beside
    ``path`` under a temporary name and renamed once, so a kill leaves no ``final/`` (or the
    previous one), never weights without their tokenizer. Returns where they are, and what a
    remote backend says names its copy on the service (for the summary). ``card(adapter)`` gives
    the model card written beside them as ``README.md``. Under several processes the main rank
    writes; the others take part in gathering sharded weights (``save_weights(None)``)."""
    world = world or World()
    if not world.is_main:
        with world.collective("gathering the final weights"):
            backend.save_weights(None)
        world.first("writing final/", lambda: None)
        return str(path), {}

    def write() -> dict[str, Any]:
        with atomic_dir(path) as tmp:
            remote = backend.save_weights(tmp) or {}
            tokenizer.save_pretrained(tmp)
            if card is not None:  # after the weights: a README a library wrote is replaced
                adapter = (Path(tmp) / "adapter_config.json").exists()
                (Path(tmp) / "README.md").write_text(card(adapter), encoding="utf-8")
        return remote

    return str(path), world.first("writing final/", write) or {}


def cache_dir(config: Config) -> Path:
    return Path(config.cache_dir) if config.cache_dir else refcache.default_cache_dir()


def remove_interrupted_saves(log_path: Path, cache: Path) -> None:
    """Delete what saves cut short (a kill, a full disk) left: temporary checkpoint and ``final``
    directories, and temporary cache files no live run is writing; say what went."""
    removed = (remove_stale(log_path, [".final.*", ".*.tmp"])
               + remove_stale(checkpoint.root(log_path), [".step-*"])
               + [p for sub in ("reference", "tokenized") for p in remove_stale(cache / sub, [".*.tmp"])])
    if removed:
        log(f"removed what interrupted saves left behind: {', '.join(map(str, removed))}")


@dataclass
class Data:
    """The run's tokenized pairs and which of them are for training and for evaluation."""

    pairs: list[TokenizedPair]
    train: list[int]
    eval: list[int]
    datasets: list[str]
    report: Any
    sha256: str  # of the tokenized pairs: keys the reference cache and checkpoints
    prepare_s: float = 0.0  # reading, parsing and tokenizing
    skipped: int = 0  # bad records left out (on_bad_record = "skip")

    def eval_batches(self, size: int) -> list[list[int]]:
        return length_batches(self.pairs, self.eval, size)

    def info(self, config: Config) -> dict[str, Any]:
        per_step = config.batch_size * config.grad_accum
        steps = math.ceil(len(self.train) / per_step)
        return {"train_pairs": len(self.train), "eval_pairs": len(self.eval),
                "steps_per_epoch": steps, "total_steps": steps * config.epochs,
                "dropped_pairs": len(self.report.dropped),
                "truncated_pairs": len(self.report.truncated), "skipped_records": self.skipped}


def prepare_data(config: Config, registry: Registry, fmt: Any, tokenizer: Any,
                 opened: list[Opened] | None = None, log_path: Path | None = None,
                 world: World | None = None) -> Data:
    """Read, check and tokenize the data sets, then split off the held-out pairs. Under several
    processes the main rank builds the tokenized-data cache first; the others then read it."""
    world = world or World()
    start = time.perf_counter()
    opened = opened if opened is not None else open_datasets(registry, config)

    def build() -> Any:
        return prepare(registry, config, fmt, tokenizer, log, log_path, opened=opened)

    tokenized = world.first("tokenizing the data", build) or prepare(
        registry, config, fmt, tokenizer, log, None, progress=False, opened=opened)
    if len(set(world.gather(tokenized.sha256))) > 1:
        raise ConfigError(f"{world.tag}the ranks read different data from {config.dataset} (their "
                          "tokenized pairs differ): every machine needs the same files")
    pairs, report = tokenized.pairs, tokenized.report
    for line in report.lines(config.max_seq_len):
        log(line)
    if config.eval_dataset:
        train = list(range(tokenized.train_count))
        held = list(range(tokenized.train_count, len(pairs)))
        check_held_out(pairs, train, held)
    else:
        train, held = split_eval(len(pairs), config.eval_fraction, config.seed)
        train, held, moved = keep_repeats_in_train(pairs, train, held)
        if moved and held:
            log(f"{moved} held-out pair(s) repeat training pairs of {config.dataset}: trained on, "
                "not held out")
        if not held and (note := no_held_out(config, len(pairs), moved)):
            log(note)
    if not train:
        raise ConfigError(no_training_pairs(config, len(pairs), len(held), report))
    log(f"{len(train)} training pairs, {len(held)} held-out pairs")
    return Data(pairs, train, held, [d.name for d in opened], report, tokenized.sha256,
                time.perf_counter() - start, len(tokenized.problems))


def resolve_reference(config: Config, loss: Loss, backend: Any) -> str:
    """``auto``: none for a loss that needs none, else what the backend says is the initial
    policy's cheapest frozen copy (``default_reference``), else a separate frozen copy."""
    if config.reference != "auto":
        return config.reference
    if not loss.needs_reference:
        return "none"
    choose = getattr(backend, "default_reference", None)
    return choose() if callable(choose) else "separate"


def reference_logps(config: Config, provider: Any, tokenizer: Any, data: Data,
                    token_logps: bool, world: World | None = None) -> refcache.ReferenceLogps:
    """Reference numbers of all pairs, from the on-disk cache when its key still matches."""
    if provider is None:
        raise ConfigError(f"loss {config.loss!r} needs a reference, but reference is 'none'")
    parts = {**provider.identity(), **hub.tokenizer_identity(tokenizer),
             "max_seq_len": str(config.max_seq_len), "data_sha256": data.sha256}
    parts = {k: str(v) for k, v in parts.items()}
    cache_file = refcache.cache_file_for(cache_dir(config), config.base_model, data.datasets)
    size = eval_batch_size(config)
    batches = length_batches(data.pairs, data.train, size) + data.eval_batches(size)
    return refcache.load_or_compute(cache_file, parts, provider, data.pairs, batches,
                                    token_logps, log, world=world or World())


def close_quietly(component: Any) -> None:
    close = getattr(component, "close", None)
    if callable(close):
        close()


def peak_mem_mb(backend: Any) -> float:
    """Peak memory so far, in MiB: the backend's own measure (a GPU's peak allocation) if it
    has one, else this process's peak resident memory."""
    measure = getattr(backend, "peak_mem_mb", None)
    return float(measure()) if callable(measure) else peak_rss_mb()


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
