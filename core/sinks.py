"""The sinks of one run: built from the registry, called in config order, closed whatever happens.

Each sink is the object its factory returned, registered in a plugin manager of the run's own that
knows only the event hooks (so a misspelled method is an error). preftune calls each sink's hook
implementations itself rather than through pluggy, which calls them last-registered first and stops
at the first exception: here the order is the order of ``config.sinks``, an error names its sink,
and ``preftune_run_end`` reaches every sink even when one of them raises.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import pluggy

from .config import Config
from .errors import ConfigError, PluginError, PreftuneError
from .manager import EVENT_HOOKS, Registry, hookspecs_for

RUN_START, RUN_END = "preftune_run_start", "preftune_run_end"


class SinkError(PreftuneError):
    """A sink's ``preftune_run_end`` raised (after the run's work was done); ``__cause__`` is why."""

    def __init__(self, sink: str, hook: str, error: BaseException):
        super().__init__(f"sink {sink!r} failed in {hook}: {type(error).__name__}: {error}")
        self.sink, self.hook, self.error = sink, hook, error
        self.__cause__ = error


class SinkSet:
    """The sinks a run selected, by name in config order, and which of them have been ended.

    ``sinks.hook.preftune_log_metrics(step=..., metrics=...)`` (and ``preftune_eval``,
    ``preftune_checkpoint``) calls every sink in order; an exception stops the run, so it is raised
    at once, unchanged but for a note naming the sink. Start and end the run with :meth:`run_start`
    and :meth:`run_end`, which call ``preftune_run_end`` on each sink exactly once.
    """

    def __init__(self, pm: pluggy.PluginManager, names: list[str]):
        self.pm = pm
        self.names = list(names)
        self.ended: set[str] = set()
        self.hook = _Relay(self)

    def _impls(self, hook: str) -> list[tuple[str, Any]]:
        """(sink name, hook implementation) of the sinks that implement ``hook``, in order."""
        by_sink = {impl.plugin_name: impl for impl in getattr(self.pm.hook, hook).get_hookimpls()}
        return [(name, by_sink[name]) for name in self.names if name in by_sink]

    def call(self, hook: str, **kwargs: Any) -> None:
        """Call ``hook`` on every sink in order; the first exception propagates, noting its sink."""
        for name, impl in self._impls(hook):
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except BaseException as exc:
                exc.add_note(f"raised by sink {name!r} in {hook}")
                raise

    def run_start(self, config: Config, info: dict[str, Any], backend: Any) -> None:
        """``preftune_run_start`` on every sink; when one raises, end all sinks, then re-raise."""
        try:
            self.call(RUN_START, config=config, info=info, backend=backend)
        except BaseException as exc:
            summary = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            error = self._end_all(summary)
            if error is not None:
                exc.add_note(f"while ending the sinks: {error}")
            raise

    def run_end(self, summary: dict[str, Any]) -> BaseException | None:
        """``preftune_run_end`` on every sink not yet ended, even after one raises; never raises.

        Returns the error for the caller to raise once it has closed the backend: a
        :class:`SinkError` naming the first sink that failed when the run had completed, a
        ``KeyboardInterrupt`` (or other non-``Exception``) a sink raised, or None. When the run
        had failed, sink errors are only printed: the run's own error is the one to raise.
        """
        error = self._end_all(summary)
        if error is None:
            return None
        if not isinstance(error.error, Exception):
            return error.error  # Ctrl-C during a sink's run_end: stop, once every sink has ended
        if summary.get("status") != "completed":
            print(f"[preftune] {error}", file=sys.stderr, flush=True)
            return None
        return error

    def _end_all(self, summary: dict[str, Any]) -> SinkError | None:
        """End every sink not yet ended; the first failure, with later ones as notes."""
        first: SinkError | None = None
        for name, impl in self._impls(RUN_END):
            if name in self.ended:
                continue
            self.ended.add(name)
            try:
                impl.function(*[{"summary": summary}[arg] for arg in impl.argnames])
            except BaseException as exc:
                if first is None:
                    first = SinkError(name, RUN_END, exc)
                else:
                    first.add_note(str(SinkError(name, RUN_END, exc)))
        self.ended.update(self.names)  # sinks without a run_end are ended too
        return first


class _Relay:
    """``sinks.hook.<event>(**kwargs)``: pluggy's calling style, in config order, naming the sink."""

    def __init__(self, sinks: SinkSet):
        self._sinks = sinks

    def __getattr__(self, hook: str) -> Callable[..., None]:
        if hook in (RUN_START, RUN_END):
            raise AttributeError(f"call SinkSet.{hook.removeprefix('preftune_')}, which ends every sink")
        if hook not in EVENT_HOOKS:
            raise AttributeError(f"no event hook {hook!r}")
        return functools.partial(self._sinks.call, hook)


def open_sinks(registry: Registry, config: Config, names: list[str] | None = None) -> SinkSet:
    """Build the sinks this run selected (or ``names``: none on a rank other than the main
    one), each checked against the event hooks."""
    names = config.sinks if names is None else names
    if len(set(names)) != len(names):
        raise ConfigError(f"sinks lists a sink twice: {names}")
    pm = pluggy.PluginManager("preftune")
    pm.add_hookspecs(hookspecs_for(EVENT_HOOKS))
    for name in names:
        sink = registry.build("sink", name, config)
        try:
            pm.register(sink, name=name)
        except pluggy.PluginValidationError as exc:  # a hook argument the hook does not have
            raise PluginError(f"sink {name!r}: {exc}") from None
    try:
        pm.check_pending()  # a misspelled event method would otherwise never be called
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"sink {pm.get_name(exc.plugin)!r}: {exc}") from None
    for impl in (i for hook in EVENT_HOOKS for i in getattr(pm.hook, hook).get_hookimpls()):
        if impl.wrapper or impl.hookwrapper:
            raise PluginError(f"sink {impl.plugin_name!r}: {impl.function.__name__} is a hook wrapper; "
                              "sink hooks are plain methods")
    return SinkSet(pm, names)
