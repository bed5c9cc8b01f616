"""The mlflow sink, run for real into a local SQLite store and read back with MLflow's own client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from preftune import ConfigError, get_plugin_manager, hookimpl, run

TIMING = {"elapsed_s", "tokens_per_s", "peak_mem_mb"}  # an interrupted run and its resume differ here


@pytest.fixture
def mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """mlflow, imported with its telemetry off (MLflow 3 sends it by default), from a working
    directory of the test's own (MLflow writes there by default)."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):  # the sink sets them: unset again afterwards
        monkeypatch.setenv(name, "1")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    pytest.importorskip("sqlalchemy")
    return pytest.importorskip("mlflow")


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_metrics_are_the_jsonl_rows(client: Any, run_id: str, logs: Path, skip: set[str]) -> None:
    """Every numeric key of metrics.jsonl and eval.jsonl is an MLflow metric holding each row's
    value at its step, once."""
    for file in ("metrics.jsonl", "eval.jsonl"):
        found = rows(logs / file)
        keys = [k for k, v in found[-1].items() if k != "step" and isinstance(v, (int, float))]
        for key in (k for k in keys if k not in skip):
            got = history(client, run_id, key)
            assert [s for s, _ in got] == [r["step"] for r in found], key
            assert [v for _, v in got] == pytest.approx([r[key] for r in found], rel=1e-12), key


class SecretOptionsPlugin:
    """A plugin with a secret option, to check it never reaches MLflow."""

    @hookimpl
    def register_sinks(self, register: Any) -> None:
        from pydantic import BaseModel, SecretStr

        class Options(BaseModel):
            api_key: SecretStr

        register("remote", lambda config, options: object(), Options)


def test_params_metrics_and_status_read_back_with_mlflows_client(make_config: Any, mlflow: Any,
                                                                  tmp_path: Path) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(SecretOptionsPlugin())
    config = make_config(sinks=["jsonl", "mlflow", "remote"], epochs=2, eval_interval=4,
                         remote={"api_key": "fw-SECRET-KEY-123"},
                         mlflow={"tracking_uri": store(tmp_path), "experiment": "pt-test",
                                 "run_name": "r1", "tags": {"team": "prefs"}})
    summary = run(config, pm)
    client = mlflow.tracking.MlflowClient(store(tmp_path))
    [found] = client.search_runs([client.get_experiment_by_name("pt-test").experiment_id])
    assert found.info.run_name == "r1" and found.info.status == "FINISHED"
    assert found.data.tags["team"] == "prefs" and "preftune.error" not in found.data.tags
    params = found.data.params
    assert params["learning_rate"] == "0.001" and params["loss"] == "dpo" and params["epochs"] == "2"
    assert params["sinks"] == '["jsonl", "mlflow", "remote"]' and params["mlflow.run_name"] == "r1"
    assert params["remote.api_key"] == "**********"
    assert b"fw-SECRET-KEY-123" not in (tmp_path / "mlflow.db").read_bytes()
    logs = Path(config.log_path)
    assert_metrics_are_the_jsonl_rows(client, found.info.run_id, logs, skip=set())
    assert history(client, found.info.run_id, "loss")[-1][0] == summary["steps"] == 10
    assert [s for s, _ in history(client, found.info.run_id, "eval_accuracy")] == [0, 4, 8, 10]
    assert json.loads((logs / "mlflow_run.json").read_text())["run_id"] == found.info.run_id


class Stop:
    """A sink that ends the run at ``step``: a crash (KeyboardInterrupt raised in the loop), or
    a Ctrl-C the run handles (it stops after the step, with a checkpoint)."""

    def __init__(self, step: int, how: str):
        self.step, self.how = step, how

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step and self.how == "crash":
            raise KeyboardInterrupt
        if step == self.step:
            signal.raise_signal(signal.SIGINT)


def stopping_at(step: int, how: str) -> Any:
    class Plugin:
        @hookimpl
        def register_sinks(self, register: Any) -> None:
            register("stop", lambda config, options: Stop(step, how))

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin())
    return pm


def test_a_resumed_run_continues_the_same_mlflow_run(make_config: Any, mlflow: Any,
                                                      tmp_path: Path) -> None:
    """Crashed at step 6 (checkpoint at 4), then resumed: one MLflow run, FAILED then FINISHED,
    each step once, equal to metrics.jsonl (the resume is exact; steps 5 and 6 keep the crashed
    run's timing), the params not logged twice."""
    config = make_config(epochs=2, checkpoint_interval=4, eval_interval=3,
                         sinks=["jsonl", "mlflow", "stop"], mlflow={"tracking_uri": store(tmp_path)})
    with pytest.raises(KeyboardInterrupt):
        run(config, stopping_at(6, "crash"))
    client = mlflow.tracking.MlflowClient(store(tmp_path))
    [crashed] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert crashed.info.status == "FAILED" and "KeyboardInterrupt" in crashed.data.tags["preftune.error"]
    assert history(client, crashed.info.run_id, "loss")[-1][0] == 6

    run(config.model_copy(update={"resume": True, "sinks": ["jsonl", "mlflow"]}))
    [resumed] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert resumed.info.run_id == crashed.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.params["resume"] == "false"  # params keep the values the run started with
    assert_metrics_are_the_jsonl_rows(client, resumed.info.run_id, Path(config.log_path), skip=TIMING)
    elapsed = history(client, resumed.info.run_id, "elapsed_s")
    assert [s for s, _ in elapsed] == list(range(1, 11))


def test_a_run_stopped_by_ctrl_c_is_killed(make_config: Any, mlflow: Any, tmp_path: Path) -> None:
    from preftune.signals import Stopped

    config = make_config(sinks=["jsonl", "mlflow", "stop"], mlflow={"tracking_uri": store(tmp_path)})
    with pytest.raises(Stopped):
        run(config, stopping_at(2, "signal"))
    client = mlflow.tracking.MlflowClient(store(tmp_path))
    [stopped] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert stopped.info.status == "KILLED" and "Ctrl-C" in stopped.data.tags["preftune.error"]


def test_the_default_store_is_mlflows_own_in_the_working_directory(
        make_config: Any, mlflow: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = make_config(epochs=1, sinks=["mlflow"], log_path=str(tmp_path / "runs" / "exp7"))
    run(config)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert found.info.run_name == "exp7" and found.info.status == "FINISHED"
    saved = json.loads((tmp_path / "runs" / "exp7" / "mlflow_run.json").read_text())
    assert saved == {"run_id": found.info.run_id, "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}


def test_missing_mlflow_names_the_extra_before_anything_loads(make_config: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    config = make_config(sinks=["mlflow"])
    with pytest.raises(ConfigError, match=r"pip install 'preftune\[mlflow\]'"):
        run(config)
    assert not Path(config.log_path).exists()


def test_a_database_store_without_sqlalchemy_names_the_extra(make_config: Any, mlflow: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow-skinny alone cannot open MLflow 3's default store, a SQLite database."""
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    config = make_config(sinks=["mlflow"])
    with pytest.raises(ConfigError, match=r"mlflow.tracking_uri: .*SQLAlchemy.*preftune\[mlflow\]"):
        run(config)
    assert not Path(config.log_path).exists()


def test_a_store_mlflow_cannot_open_names_tracking_uri(make_config: Any, mlflow: Any) -> None:
    config = make_config(sinks=["mlflow"], mlflow={"tracking_uri": "nosuchstore://user:pw-123456@host"})
    with pytest.raises(ConfigError, match="mlflow.tracking_uri: cannot log to nosuchstore") as error:
        run(config)
    assert "pw-123456" not in str(error.value)
    assert not Path(config.log_path).exists()  # said before anything loads


NO_NETWORK = """
import json, socket, sys, time
from preftune import Config
from preftune.plugins.mlflow_sink import MLflowOptions, MLflowSink

hosts = []
def refuse(host, *args, **kwargs):  # records, and reaches nothing
    hosts.append(host)
    raise OSError("no network in this test")
socket.getaddrinfo = refuse
options = MLflowOptions(**json.loads(sys.argv[1]))
config = Config(base_model="m", dataset="d", log_path=sys.argv[2], sinks=["mlflow"])
MLflowSink.check(config, options)
sink = MLflowSink(config, options)
sink.preftune_run_start(config, {"config": {"loss": "dpo"}}, None)
sink.preftune_log_metrics(1, {"loss": 0.5})
sink.preftune_run_end({"status": "completed"})
from mlflow.telemetry import get_telemetry_client
deadline = time.monotonic() + (10 if options.telemetry else 0)
while not hosts and time.monotonic() < deadline:  # MLflow fetches its config in a thread
    time.sleep(0.05)
print(json.dumps({"hosts": hosts, "telemetry_client": get_telemetry_client() is not None}))
"""


def test_mlflows_telemetry_is_off_unless_asked_for(tmp_path: Path, mlflow: Any) -> None:
    """In a process where MLflow would send telemetry (no CI or pytest variables), the sink
    reaches no host; with ``telemetry = true`` MLflow tries to (the test lets nothing out)."""
    quiet = ("CI", "PYTEST_CURRENT_TEST", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY",
             "GITHUB_ACTIONS", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # MLflow keeps an installation id there
    found = {}
    for telemetry in (False, True):
        options = json.dumps({"tracking_uri": store(tmp_path), "telemetry": telemetry})
        out = subprocess.run([sys.executable, "-c", NO_NETWORK, options, str(tmp_path / f"logs{telemetry}")],
                             env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        found[telemetry] = json.loads(out.stdout.splitlines()[-1])
    # no client, and no look-up: telemetry was never on (a client drops itself only after its
    # look-up fails, as it does in the control, where MLflow tried its telemetry server)
    assert found[False] == {"hosts": [], "telemetry_client": False}
    assert any("mlflow-telemetry" in str(host) for host in found[True]["hosts"]), found[True]


def test_the_run_file_keeps_no_password(make_config: Any) -> None:
    from preftune.plugins.mlflow_sink import MLflowOptions, MLflowSink

    config = make_config(sinks=["mlflow"])
    sink = MLflowSink(config, MLflowOptions())
    sink.run_id = "abc"
    for uri, kept in (("http://user:pw-secret@host:5000", False), ("https://host/?token=t-secret", False),
                      ("http://host:5000", True)):
        sink._save(uri)
        saved = json.loads((Path(config.log_path) / "mlflow_run.json").read_text())
        assert saved == ({"run_id": "abc", "tracking_uri": uri} if kept else {"run_id": "abc"})


def test_eval_samples_are_a_table_artifact_per_evaluation(make_config: Any, mlflow: Any,
                                                          tmp_path: Path) -> None:
    config = make_config(sinks=["jsonl", "mlflow"], eval_samples=2, eval_sample_tokens=4,
                         mlflow={"tracking_uri": store(tmp_path)})
    run(config)
    client = mlflow.tracking.MlflowClient(store(tmp_path))
    [found] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    files = [f.path for f in client.list_artifacts(found.info.run_id, "eval_samples")]
    assert (tmp_path / "mlartifacts").is_dir()  # beside the database, not in the working directory
    assert files == ["eval_samples/step-00000000.json", "eval_samples/step-00000005.json"]
    samples = rows(Path(config.log_path) / "samples.jsonl")
    for step, file in zip((0, 5), files):
        local = client.download_artifacts(found.info.run_id, file, str(tmp_path))
        table = json.loads(Path(local).read_text())
        assert table["columns"] == ["step", "source", "prompt", "completion", "chosen"]
        assert table["data"] == [[r[c] for c in table["columns"]] for r in samples if r["step"] == step]


def test_a_tracking_server_that_cannot_be_reached_is_a_clear_error_within_the_timeout(
        make_config: Any, mlflow: Any) -> None:
    import time

    config = make_config(sinks=["mlflow"], mlflow={"tracking_uri": "http://127.0.0.1:1", "timeout_s": 2})
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"mlflow\.tracking_uri: cannot log to http://127\.0\.0\.1:1"):
        run(config)
    assert time.monotonic() - start < 60  # MLflow's own retries wait about 4 minutes


def test_a_store_that_fails_during_the_run_ends_mlflow_logging_not_the_run(
        make_config: Any, mlflow: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.exceptions import MlflowException

    real = mlflow.tracking.MlflowClient.log_batch
    calls = {"metrics": 0}

    def failing(self: Any, run_id: str, metrics: Any = (), **kwargs: Any) -> Any:
        if metrics and any(m.step >= 4 for m in metrics):  # the server goes away after step 3
            raise MlflowException("API request to http://user:pw@mlflow.example/api failed: 503")
        calls["metrics"] += bool(metrics)
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "log_batch", failing)
    config = make_config(sinks=["jsonl", "mlflow"], mlflow={"tracking_uri": store(tmp_path)})
    summary = run(config)
    assert summary["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("mlflow: cannot log to") == 1 and "at step 4" in err and "pw@" not in err
    assert "the run goes on without MLflow (metrics.jsonl keeps every step)" in err
    client = mlflow.tracking.MlflowClient(store(tmp_path))
    [found] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert [s for s, _ in history(client, found.info.run_id, "loss")] == [1, 2, 3]
    assert found.info.status == "FINISHED"  # the end is tried again, and this store answers


def test_a_resume_whose_mlflow_run_was_deleted_starts_a_new_one(
        make_config: Any, mlflow: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(sinks=["jsonl", "mlflow", "stop"], epochs=2, checkpoint_interval=4,
                         mlflow={"tracking_uri": store(tmp_path)})
    with pytest.raises(KeyboardInterrupt):
        run(config, stopping_at(6, "crash"))
    client = mlflow.tracking.MlflowClient(store(tmp_path))
    first = json.loads((Path(config.log_path) / "mlflow_run.json").read_text())["run_id"]
    client.delete_run(first)
    summary = run(config.model_copy(update={"resume": True, "sinks": ["jsonl", "mlflow"]}))
    assert summary["status"] == "completed"
    assert f"mlflow: run {first} was deleted" in capsys.readouterr().err
    second = json.loads((Path(config.log_path) / "mlflow_run.json").read_text())["run_id"]
    assert second != first and client.get_run(second).info.status == "FINISHED"
