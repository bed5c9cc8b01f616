"""The ``mlflow`` sink: the config with secrets masked as the run's params, each step's metrics and
each evaluation's against the optimizer step, and the run's end as MLflow's status (``FINISHED``,
``KILLED`` when stopped, ``FAILED``). Written with MLflow's client API (``MlflowClient``), which
sets no global active run and records no source or git tags.

Where: ``[mlflow] tracking_uri``, else where MLflow itself would log: ``$MLFLOW_TRACKING_URI``,
else ``sqlite:///mlflow.db`` in the working directory (MLflow 3's default; its ``./mlruns`` file
store is refused unless ``MLFLOW_ALLOW_FILE_STORE`` is set). So runs gather in one store, side by
side, as MLflow users expect, and ``mlflow ui`` in that directory shows them.

A resumed run continues the same MLflow run: its id (and a local store's URI) is kept in
``log_path/mlflow_run.json``. MLflow cannot delete metric values, so the steps the interrupted run
logged after its checkpoint are not logged again (a resume is exact: the same numbers, but for
timing); params keep their first values (MLflow refuses to change one).

MLflow 3 sends usage telemetry by default (it fetches its config from mlflow-telemetry.io at the
first logged event). preftune turns it off (``MLFLOW_DISABLE_TELEMETRY=true`` in its process,
before mlflow is imported) unless ``[mlflow] telemetry = true``: a run reaches no host but the
tracking server the user named."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from preftune import Config, ConfigError, hookimpl, log, mask_secrets
from preftune.samples import sample_table

RUN_FILE = "mlflow_run.json"
STATUS = {"completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}  # MLflow's RunStatus names
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's value (longer ones are cut, marked "...")
BATCH = 100  # params per log_batch call (MLflow's limit)
RETRIES = 2  # of a request to a tracking server (MLflow's default, 7 with backoff, waits minutes)


class MLflowOptions(BaseModel):
    """Options of the ``[mlflow]`` table."""

    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = Field(None, description=(
        "Where the run is logged: a database (`sqlite:///path.db`), a server (`http://host:5000`), "
        "`databricks`, ...; default MLflow's own: $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in "
        "the working directory."))
    experiment: str | None = Field(None, description=(
        "Experiment name (created if missing); default $MLFLOW_EXPERIMENT_NAME, else 'preftune'."))
    run_name: str | None = Field(None, description="Run name; default the name of log_path.")
    tags: dict[str, str] = Field({}, description="Tags set on the run.")
    timeout_s: float = Field(30.0, gt=0, description=(
        "Seconds MLflow waits for each request to a tracking server (two retries, so a server that "
        "cannot be reached costs about three times this): unreachable at the start, the run stops "
        "with an error naming mlflow.tracking_uri; during the run, it goes on without MLflow and "
        "says so (metrics.jsonl keeps every step). $MLFLOW_HTTP_REQUEST_TIMEOUT and "
        "$MLFLOW_HTTP_REQUEST_MAX_RETRIES, when set, win."), json_schema_extra={"operational": True})
    telemetry: bool = Field(False, description=(
        "Let MLflow send its usage telemetry (on by default in MLflow 3). Off: preftune sets "
        "MLFLOW_DISABLE_TELEMETRY=true before it imports mlflow."))


def import_mlflow(telemetry: bool, timeout_s: float = 30.0) -> Any:
    """The ``mlflow`` module, its telemetry off unless asked for, its requests to a server
    bounded (MLflow's own default retries an unreachable server for minutes); missing: a
    ConfigError."""
    if not telemetry:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # read when mlflow is imported
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(int(timeout_s), 1)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    try:
        import mlflow
    except ImportError:
        raise ConfigError("the mlflow sink needs mlflow: pip install 'preftune[mlflow]'") from None
    if not telemetry and hasattr(mlflow, "telemetry"):  # an MLflow with telemetry (3.2 on, say)
        mlflow.telemetry.set_telemetry_client()  # drops the client of an import made before
    return mlflow


def needs_sqlalchemy(uri: str) -> None:
    """A database store needs SQLAlchemy and Alembic, which mlflow-skinny does not install."""
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        return
    try:
        import alembic  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise ConfigError(f"mlflow.tracking_uri: the database store {uri.split(':')[0]} needs SQLAlchemy "
                          "and Alembic: pip install 'preftune[mlflow]'") from None


def absolute(uri: str) -> str:
    """A local SQLite URI with its path made absolute (a resume may start elsewhere)."""
    prefix = "sqlite:///"
    path = uri.removeprefix(prefix)
    if not uri.startswith(prefix) or path.startswith("/") or path in ("", ":memory:"):
        return uri
    return prefix + str(Path(path).resolve())


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a local SQLite URI, else None."""
    if uri is None or not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(absolute(uri).removeprefix("sqlite:///"))


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a local database keeps its artifacts (the eval samples):
    ``mlartifacts/`` beside the database file, as ``mlflow server`` does, not MLflow's default
    ``./mlruns`` in whatever directory the run starts from; a server decides its own (None)."""
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "mlartifacts").as_uri()


def open_client(mlflow: Any, uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` (a database store is created here); a URI MLflow cannot
    use is a ConfigError naming ``mlflow.tracking_uri``, its password masked."""
    try:
        return mlflow.tracking.MlflowClient(tracking_uri=uri)
    except mlflow.exceptions.MlflowException as exc:
        raise bad_uri(uri, exc) from None


def bad_uri(uri: str, error: Exception) -> ConfigError:
    message = mask_secrets(str(error).strip().splitlines()[0])
    return ConfigError(f"mlflow.tracking_uri: cannot log to {mask_secrets(uri)}: {message}")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: ``table.key`` names, JSON for what is not a string."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flatten(value, f"{prefix}{key}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        cut = len(text) > MAX_PARAM_VALUE
        params[f"{prefix}{key}"] = text[: MAX_PARAM_VALUE - 3] + "..." if cut else text
    return params


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are numbers, as floats."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MLflowSink:
    @staticmethod
    def check(config: Config, options: MLflowOptions) -> None:
        mlflow = import_mlflow(options.telemetry, options.timeout_s)  # missing: said before anything loads
        uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:"
        needs_sqlalchemy(uri)
        if not uri.startswith(("sqlite:", "file:", "/", ".")) and ":" in uri:
            open_client(mlflow, uri)  # a scheme MLflow has no store for; a server is not called

    @staticmethod
    def outputs(config: Config, options: MLflowOptions) -> list[tuple[str, str, str]]:
        """A local SQLite file named in the config (checked against the run's inputs)."""
        path = sqlite_path(options.tracking_uri)
        return [] if path is None else [(str(path), "the mlflow sink's database", "mlflow.tracking_uri")]

    def __init__(self, config: Config, options: MLflowOptions):
        self.options = options
        self.run_file = Path(config.log_path) / RUN_FILE
        self.run_name = options.run_name or Path(config.log_path).resolve().name
        self.client: Any = None
        self.run_id: str | None = None
        self.logged: dict[str, int] = {}  # metric -> the last step the MLflow run holds
        self.uri = ""
        self.lost_from: int | None = None  # the step from which MLflow could not be written
        self.jsonl = "jsonl" in config.sinks

    @hookimpl
    def preftune_run_start(self, config: Config, info: dict[str, Any], backend: Any) -> None:
        mlflow = import_mlflow(self.options.telemetry, self.options.timeout_s)
        saved = self._saved() if info.get("resume_step") else {}
        uri = absolute(self.options.tracking_uri or saved.get("tracking_uri") or mlflow.get_tracking_uri())
        self.client = open_client(mlflow, uri)
        try:
            run = self._continue(saved.get("run_id"), uri) or self._create()
        except mlflow.exceptions.MlflowException as exc:  # a server that refuses, a deleted experiment
            raise bad_uri(uri, exc) from None
        self.run_id, self.uri = run.info.run_id, uri
        self._save(uri)
        self._log_params(flatten(info.get("config", {})), run.data.params)
        log(f"mlflow: logging to run {self.run_id} ({self.run_name}) in {mask_secrets(uri)}")

    def _saved(self) -> dict[str, str]:
        try:
            return json.loads(self.run_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, uri: str) -> None:
        record = {"run_id": self.run_id}
        if urlsplit(uri).password is None and "?" not in uri:  # a password or token stays out
            record["tracking_uri"] = uri
        self.run_file.parent.mkdir(parents=True, exist_ok=True)
        self.run_file.write_text(json.dumps(record) + "\n")

    def _continue(self, run_id: str | None, uri: str) -> Any:
        """The interrupted run's MLflow run, running again, and the steps it holds; or None."""
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            log(f"mlflow: run {run_id} is not in {mask_secrets(uri)}; starting a new MLflow run")
            return None
        if run.info.lifecycle_stage == "deleted":  # MLflow refuses to log to it
            log(f"mlflow: run {run_id} was deleted in {mask_secrets(uri)}; starting a new MLflow run")
            return None
        self.client.update_run(run_id, status="RUNNING")
        for key in run.data.metrics:
            self.logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        return run

    def _create(self) -> Any:
        name = self.options.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "preftune"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=artifact_location(self.client.tracking_uri))
        return self.client.create_run(experiment_id, run_name=self.run_name, tags=self.options.tags)

    def _log_params(self, params: dict[str, str], held: dict[str, str]) -> None:
        """Params the run does not hold yet; one a resume changed keeps its first value."""
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in held and held[k] != v and k != "resume")
        if changed:
            log(f"mlflow: params keep the values the run started with: {', '.join(changed)} changed")
        new = [Param(k, v) for k, v in params.items() if k not in held]
        for at in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[at : at + BATCH])

    def _log(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in numbers(metrics).items()
                 if step > self.logged.get(key, -1)]  # not again what an interrupted run logged
        if batch:
            self._call(step, lambda: self.client.log_batch(self.run_id, metrics=batch))

    def _call(self, step: int, write: Any, again: bool = False) -> None:
        """``write()`` to MLflow, unless it failed before (``again``: try anyway): a tracking
        server that stops answering (or a full disk under a local store) ends MLflow's logging,
        said once, not the run."""
        if self.lost_from is not None and not again:
            return
        try:
            write()
        except Exception as exc:  # MlflowException, the HTTP client's, OSError: one line, no traceback
            if self.lost_from is not None:
                return  # said already
            self.lost_from = step
            kept = "metrics.jsonl keeps every step" if self.jsonl else "add the jsonl sink to keep them"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log(f"mlflow: cannot log to {mask_secrets(self.uri)} at step {step}: {mask_secrets(reason)}; "
                f"the run goes on without MLflow ({kept})")

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics)

    @hookimpl
    def preftune_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics)

    @hookimpl
    def preftune_log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """One artifact per evaluation, ``eval_samples/step-NNNNNNNN.json``, in MLflow's table
        form (``columns``, ``data``); a resume that redoes a step writes it over."""
        columns, rows = sample_table(samples)
        table = {"columns": columns, "data": rows}
        name = f"eval_samples/step-{step:08d}.json"
        self._call(step, lambda: self.client.log_dict(self.run_id, table, name))

    @hookimpl
    def preftune_run_end(self, summary: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        step = summary.get("steps", 0)
        if summary.get("error"):
            error = str(summary["error"])[:MAX_PARAM_VALUE]
            self._call(step, lambda: self.client.set_tag(run_id, "preftune.error", error), again=True)
        status = STATUS.get(summary.get("status", "failed"), "FAILED")  # the server may be back
        self._call(step, lambda: self.client.set_terminated(run_id, status), again=True)
        if self.lost_from is not None:
            log(f"mlflow: run {run_id} lacks what came from step {self.lost_from} on (the tracking "
                "server could not be written)")


@hookimpl
def register_sinks(register: Any) -> None:
    register("mlflow", MLflowSink, MLflowOptions)
