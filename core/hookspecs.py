"""The hooks a preftune plugin can implement.

Two kinds of hook live here. The ``register_*`` hooks are for discovery: the plugin manager calls
each one once, with a ``register(name, factory, options=None)`` callback, and the run later builds
the components its config names. The ``preftune_*`` event hooks are for sinks: they are called
only on the sinks a run selected (each run has its own small plugin manager holding just those).

Plugins import the markers as ``from preftune import hookimpl``; this module is not public API.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("preftune")
hookimpl = pluggy.HookimplMarker("preftune")


@hookspec
def register_formats(register: Any) -> None:
    """Register dataset formats.

    Call ``register(name, factory, options=None)`` for each format. ``factory(config, options)``
    returns a :class:`preftune.DatasetFormat` that turns one JSON record into a
    :class:`preftune.PreferencePair`. ``options`` is the pydantic model of the format's
    ``[name]`` config table, or None when it takes no options.
    """


@hookspec
def register_sources(register: Any) -> None:
    """Register data sources (where records come from: files, directories, hub ids, stores).

    Call ``register(name, factory, options=None)`` for each source. ``factory(config, options)``
    returns a :class:`preftune.DataSource`. A data set setting ``name:spec`` reads ``spec`` with
    the source ``name``; a setting without a known prefix is read by the one source that
    ``claims`` it.
    """


@hookspec
def register_losses(register: Any, registry: Any) -> None:
    """Register preference losses.

    Call ``register(name, factory, options=None)``; ``factory(config, options)`` returns a
    :class:`preftune.Loss`: a callable ``(policy, reference) -> (loss, metrics)`` of per-sequence
    log-probs (:class:`preftune.PairLogps`), with a ``needs_reference`` attribute and, for a loss
    that needs per-token values, ``needs_token_logps = True``.

    ``registry`` (name it only if needed) is the registry being filled, for a loss made of other
    losses: its factory builds them with ``registry.build("loss", name, config)`` as the run
    builds its loss. It is complete once every plugin has registered, so use it in the factory,
    not in this hook.
    """


@hookspec
def register_reference_providers(register: Any) -> None:
    """Register reference providers (where reference log-probs come from).

    Call ``register(name, factory, options=None)``; ``factory(config, options, backend)`` returns
    a :class:`preftune.ReferenceProvider`, or None when the run needs no reference model.
    """


@hookspec
def register_backends(register: Any) -> None:
    """Register backends (where forward, backward and optimizer steps run).

    Call ``register(name, factory, options=None)``; ``factory(config, options, tokenizer)``
    returns a :class:`preftune.Backend`.
    """


@hookspec
def register_sinks(register: Any) -> None:
    """Register sinks (metrics, checkpoints, weight sync).

    Call ``register(name, factory, options=None)``; ``factory(config, options)`` returns an
    object whose methods are ``@hookimpl`` implementations of the ``preftune_*`` event hooks below.
    A run registers the sinks its config names, and only those, in its own plugin manager.
    """


@hookspec
def preftune_backend_ready(config: Any, backend: Any) -> None:
    """Called once the backend is built, before the reference pass and the first step (and
    before ``preftune_run_start``).

    A sink that will ask the backend for something checks it here, so that a run that cannot
    do it stops before any work (the ``weight_sync`` sink checks that the backend can publish
    weights and that the deployment it names is there and ready). ``config`` is the resolved
    :class:`preftune.Config`; ``backend`` is the run's :class:`preftune.Backend`.
    """


@hookspec
def preftune_run_start(config: Any, info: dict[str, Any], backend: Any) -> None:
    """Called once before the first step.

    ``config`` is the resolved :class:`preftune.Config`; ``info`` holds facts about the run
    (``train_pairs``, ``eval_pairs``, ``steps_per_epoch``, ``total_steps``, ``resume_step``,
    ``dropped_pairs``, ``truncated_pairs``, and ``config``: the config as JSON with secrets
    masked, the only form of it a sink should log);
    ``backend`` is the run's :class:`preftune.Backend`, for sinks that publish weights.
    """


@hookspec
def preftune_log_metrics(step: int, metrics: dict[str, float]) -> None:
    """Called after every optimizer step with that step's metrics (plain floats).

    ``metrics`` holds ``epoch``, the loss's metrics, ``grad_norm``, ``lr``, ``tokens``,
    ``tokens_per_s`` and ``elapsed_s``.
    """


@hookspec
def preftune_eval(step: int, metrics: dict[str, float]) -> None:
    """Called after each held-out evaluation with ``eval_*`` metrics (e.g. ``eval_loss``)."""


@hookspec
def preftune_log_samples(step: int, samples: list[dict[str, Any]]) -> None:
    """Called after an evaluation when ``eval_samples`` is set, with the policy's greedy
    completions of held-out prompts: one dict per prompt with ``step``, ``index`` (of the pair),
    ``source`` (``file:line``), ``prompt``, ``completion``, ``chosen`` (the pair's, to compare),
    ``new_tokens`` and ``stopped`` (it ended at a stop token, not at ``eval_sample_tokens``)."""


@hookspec
def preftune_checkpoint(step: int, path: str) -> None:
    """Called after a checkpoint or the final weights were written completely to ``path``."""


@hookspec
def preftune_run_end(summary: dict[str, Any]) -> None:
    """Called once when the run ends, with the final summary; close files here.

    ``summary["status"]`` is ``"completed"``, or ``"failed"`` with ``summary["error"]``.
    """
