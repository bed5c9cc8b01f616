"""The sinks of a run: config order, errors that name their sink, every sink ended exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from preftune import Config, ConfigError, PluginError, get_plugin_manager, get_registry, hookimpl, run
from preftune.plugins.jsonl import JsonlSink
from preftune.plugins.local import LocalBackend
from preftune.sinks import SinkError, SinkSet, open_sinks

FAILED = {"status": "failed", "error": "RuntimeError: boom"}
COMPLETED = {"status": "completed", "steps": 3}


class Recorder:
    """A sink that records its calls in a shared list and raises in the hooks named in ``fail``."""

    def __init__(self, name: str, calls: list[tuple[str, str, Any]], fail: dict[str, BaseException]):
        self.name, self.calls, self.fail = name, calls, fail

    def _record(self, hook: str, value: Any) -> None:
        self.calls.append((self.name, hook, value))
        if hook in self.fail:
            raise self.fail[hook]

    @hookimpl
    def preftune_run_start(self, info: dict[str, Any]) -> None:
        self._record("run_start", info["total_steps"])

    @hookimpl
    def preftune_log_metrics(self, step: int) -> None:
        self._record("log_metrics", step)

    @hookimpl
    def preftune_run_end(self, summary: dict[str, Any]) -> None:
        self._record("run_end", summary["status"])


class Recorders:
    """Registers sinks ``a``, ``b`` and ``c``; ``fail`` maps a sink to the hooks it raises in."""

    def __init__(self, fail: dict[str, dict[str, BaseException]] | None = None):
        self.calls: list[tuple[str, str, Any]] = []
        self.fail = fail or {}

    @hookimpl
    def register_sinks(self, register: Any) -> None:
        for name in "abc":
            register(name, self._factory(name))

    def _factory(self, name: str) -> Any:
        return lambda config, options: Recorder(name, self.calls, self.fail.get(name, {}))


def sink_set(recorders: Recorders, names: list[str], plugin: Any = None) -> SinkSet:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(recorders)
    if plugin is not None:
        pm.register(plugin)
    config = Config(base_model="builtin:tiny", dataset="d", sinks=names)
    return open_sinks(get_registry(pm), config)


def start(sinks: SinkSet) -> None:
    sinks.run_start(config=None, info={"total_steps": 3}, backend=None)  # type: ignore[arg-type]


def test_sinks_are_called_in_config_order() -> None:
    recorders = Recorders()
    sinks = sink_set(recorders, ["c", "a", "b"])
    start(sinks)
    sinks.hook.preftune_log_metrics(step=1, metrics={})
    assert sinks.run_end(COMPLETED) is None
    assert [(name, hook) for name, hook, _ in recorders.calls] == [
        (name, hook) for hook in ("run_start", "log_metrics", "run_end") for name in "cab"]


def test_every_sink_ends_when_one_raises_and_the_first_error_names_its_sink() -> None:
    error = OSError("disk full")
    recorders = Recorders({"a": {"run_end": error}, "b": {"run_end": ValueError("second")}})
    sinks = sink_set(recorders, ["a", "b", "c"])
    start(sinks)
    result = sinks.run_end(COMPLETED)
    assert isinstance(result, SinkError)
    assert str(result) == "sink 'a' failed in preftune_run_end: OSError: disk full"
    assert result.sink == "a" and result.__cause__ is error
    assert "sink 'b' failed in preftune_run_end: ValueError: second" in result.__notes__[0]
    assert [name for name, hook, _ in recorders.calls if hook == "run_end"] == ["a", "b", "c"]


def test_after_a_failed_run_sink_errors_are_printed_not_returned(capsys: pytest.CaptureFixture[str]) -> None:
    recorders = Recorders({"a": {"run_end": OSError("disk full")}})
    sinks = sink_set(recorders, ["a", "b"])
    assert sinks.run_end(FAILED) is None  # the run's own error is the one the caller raises
    assert "sink 'a' failed in preftune_run_end: OSError: disk full" in capsys.readouterr().err
    assert [(name, status) for name, _, status in recorders.calls] == [("a", "failed"), ("b", "failed")]


def test_each_sink_ends_once() -> None:
    recorders = Recorders()
    sinks = sink_set(recorders, ["a", "b"])
    assert sinks.run_end(FAILED) is None
    assert sinks.run_end(COMPLETED) is None
    assert len(recorders.calls) == 2


def test_ctrl_c_in_a_sinks_run_end_still_ends_the_others() -> None:
    interrupt = KeyboardInterrupt()
    recorders = Recorders({"a": {"run_end": interrupt}})
    sinks = sink_set(recorders, ["a", "b"])
    assert sinks.run_end(COMPLETED) is interrupt  # returned as is, for the caller to raise
    assert [name for name, _, _ in recorders.calls] == ["a", "b"]


def test_a_sink_failing_in_run_start_ends_every_sink_and_keeps_its_error() -> None:
    recorders = Recorders({"b": {"run_start": ConfigError("cannot publish")}})
    sinks = sink_set(recorders, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="cannot publish") as info:
        start(sinks)
    assert "raised by sink 'b' in preftune_run_start" in info.value.__notes__
    assert recorders.calls == [
        ("a", "run_start", 3), ("b", "run_start", 3),  # c never starts
        ("a", "run_end", "failed"), ("b", "run_end", "failed"), ("c", "run_end", "failed"),
    ]
    assert sinks.run_end(FAILED) is None  # the loop's own run_end then ends nothing twice
    assert len(recorders.calls) == 5


def test_an_event_error_stops_at_once_and_names_its_sink() -> None:
    recorders = Recorders({"a": {"log_metrics": KeyboardInterrupt()}})
    sinks = sink_set(recorders, ["a", "b"])
    with pytest.raises(KeyboardInterrupt) as info:
        sinks.hook.preftune_log_metrics(step=1, metrics={})
    assert info.value.__notes__ == ["raised by sink 'a' in preftune_log_metrics"]
    assert recorders.calls == [("a", "log_metrics", 1)]


def test_run_start_and_run_end_are_not_relayed() -> None:
    sinks = sink_set(Recorders(), ["a"])
    with pytest.raises(AttributeError, match="SinkSet.run_end"):
        sinks.hook.preftune_run_end(summary=COMPLETED)
    with pytest.raises(AttributeError, match="no event hook"):
        sinks.hook.preftune_log_metric(step=1, metrics={})


class BadSinks:
    """Sinks with a misspelled method, a discovery hook, and a hook wrapper."""

    @hookimpl
    def register_sinks(self, register: Any) -> None:
        class Typo:
            @hookimpl
            def preftune_log_metric(self, step: int) -> None: ...

        class Discovery:
            @hookimpl
            def register_losses(self, register: Any) -> None: ...

        class Wrapper:
            @hookimpl(wrapper=True)
            def preftune_eval(self, step: int) -> Any:
                return (yield)

        register("typo", lambda config, options: Typo())
        register("discovery", lambda config, options: Discovery())
        register("wrapper", lambda config, options: Wrapper())


@pytest.mark.parametrize(("name", "match"), [
    ("typo", "sink 'typo'.*unknown hook 'preftune_log_metric'"),
    ("discovery", "sink 'discovery'.*unknown hook 'register_losses'"),
    ("wrapper", "sink 'wrapper': preftune_eval is a hook wrapper"),
])
def test_sink_objects_are_checked_against_the_event_hooks(name: str, match: str) -> None:
    with pytest.raises(PluginError, match=match):
        sink_set(Recorders(), [name], BadSinks())


def test_a_sink_listed_twice_is_an_error() -> None:
    with pytest.raises(ConfigError, match="sinks lists a sink twice"):
        sink_set(Recorders(), ["a", "a"])


# End to end, through preftune.run.


class JsonlSpy:
    """The real jsonl sink, registered as ``jsonl_spy`` so the test can look at it afterwards."""

    def __init__(self) -> None:
        self.sinks: list[JsonlSink] = []

    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("jsonl_spy", self._factory)

    def _factory(self, config: Config, options: Any) -> JsonlSink:
        self.sinks.append(JsonlSink(config.log_path))
        return self.sinks[-1]


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> list[LocalBackend]:
    """The local backends whose ``close`` was called."""
    calls: list[LocalBackend] = []
    original = LocalBackend.close

    def close(self: LocalBackend, status: str = "completed") -> None:
        calls.append(self)
        original(self)

    monkeypatch.setattr(LocalBackend, "close", close)
    return calls


def spied_run(config: Config, recorders: Recorders, spy: JsonlSpy) -> dict[str, Any]:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(recorders)
    pm.register(spy)
    return run(config, pm)


def test_a_sink_failing_at_the_end_still_lets_jsonl_and_the_backend_close(
    make_config: Any, closed: list[LocalBackend]
) -> None:
    config = make_config(sinks=["a", "jsonl_spy"])
    recorders, spy = Recorders({"a": {"run_end": OSError("disk full")}}), JsonlSpy()
    with pytest.raises(SinkError, match="sink 'a' failed in preftune_run_end: OSError: disk full"):
        spied_run(config, recorders, spy)
    [jsonl] = spy.sinks
    assert jsonl.files == {}  # its run_end ran and closed its files
    assert len(closed) == 1
    steps = [json.loads(line)["step"] for line in (Path(config.log_path) / "metrics.jsonl").open()]
    assert steps == list(range(1, len(steps) + 1)) and steps
    assert (Path(config.log_path) / "final").is_dir()  # the run's work was done


def test_a_sink_failing_at_the_start_ends_the_others_and_closes_the_backend(
    make_config: Any, closed: list[LocalBackend]
) -> None:
    config = make_config(sinks=["jsonl_spy", "a", "b"])
    recorders, spy = Recorders({"a": {"run_start": ConfigError("cannot publish")}}), JsonlSpy()
    with pytest.raises(ConfigError, match="cannot publish") as info:
        spied_run(config, recorders, spy)
    assert "raised by sink 'a' in preftune_run_start" in info.value.__notes__
    assert [(name, status) for name, hook, status in recorders.calls if hook == "run_end"] == [
        ("a", "failed"), ("b", "failed")]
    assert spy.sinks[0].files == {}
    assert len(closed) == 1


def test_a_real_run_starts_and_ends_every_sink_once(make_config: Any, closed: list[LocalBackend]) -> None:
    """Holds with or without the wiring, and must go on holding."""
    recorders, spy = Recorders(), JsonlSpy()
    summary = spied_run(make_config(sinks=["jsonl_spy", "a"]), recorders, spy)
    assert spy.sinks[0].files == {}
    hooks = [hook for name, hook, _ in recorders.calls]
    assert hooks == ["run_start"] + ["log_metrics"] * summary["steps"] + ["run_end"]
    assert len(closed) == 1
